//! The local vault on 10,000 entries: what `dso secret get` and `dso secret set` cost
//! besides process start, and what the agent's metadata poll costs.
//!
//! `get`: read the whole file, check its key check and MAC, decrypt one entry.
//! `set`: take the lock, read and verify the file, seal one value, write the whole file to
//! a temp file, fsync, rename, fsync the directory (so the figure includes two fsyncs on
//! the disk under target/tmp). `provider_version_unchanged`: the watcher's poll of
//! one reference while the file is unchanged (one `fstat`, no read).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use dso_secrets::SecretValue;
use dso_secrets::local::{LocalProvider, LocalVault, NewKey};
use dso_secrets::provider::Provider;

const ENTRIES: usize = 10_000;

fn bench(c: &mut Criterion) {
    // On the disk under target/, not a tmpfs: the fsyncs of `set` must cost what they cost.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("vault.enc");
    let vault = LocalVault::create(&path, NewKey::KeyFile(dir.path().join("master.key"))).unwrap();
    let values: Vec<(String, SecretValue)> = (0..ENTRIES)
        .map(|i| {
            (
                format!("app{:02}/secret_{i:05}", i % 50),
                SecretValue::new(format!("value-{i:05}-0123456789abcdef0123456789abcdef").into_bytes()),
            )
        })
        .collect();
    let mut items: Vec<(&str, &SecretValue)> = values.iter().map(|(n, v)| (n.as_str(), v)).collect();
    items.sort_by_key(|(n, _)| *n);
    vault.set_many(&items).unwrap();
    let file_len = std::fs::metadata(&path).unwrap().len();
    eprintln!("vault: {ENTRIES} entries, {file_len} bytes");

    let mut g = c.benchmark_group("vault_10k");
    g.bench_function("get", |b| {
        b.iter(|| black_box(vault.get("app07/secret_05007").unwrap().unwrap().1.len()))
    });
    g.bench_function("list", |b| b.iter(|| black_box(vault.list().unwrap().len())));
    let new_value = SecretValue::from_slice(b"a new value of some length, 48 bytes or so....");
    g.bench_function("set", |b| {
        b.iter(|| black_box(vault.set("app07/secret_05007", &new_value).unwrap().version))
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let provider = LocalProvider::new(
        "local",
        LocalVault::open(
            &path,
            dso_secrets::local::KeySource::KeyFile(dir.path().join("master.key")),
        )
        .unwrap(),
    );
    let reference = provider.parse("app07/secret_05007").unwrap();
    rt.block_on(provider.version(&reference)).unwrap();
    g.bench_function("provider_version_unchanged", |b| {
        b.iter(|| black_box(rt.block_on(provider.version(&reference)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
