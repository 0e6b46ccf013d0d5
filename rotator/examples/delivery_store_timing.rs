//! Times the delivery store: `write_group` of 10 files of 1 KiB (a fresh group and a
//! replace of an existing one) and `wipe` of such an instance.
//!
//! Needs root (it mounts its own tmpfs on a temp dir and unmounts it at the end):
//! `cargo run --release -p dso-rotator --example delivery_store_timing [ITERATIONS]`

use std::time::{Duration, Instant};

use dso_rotator::delivery::store::{FileSpec, Store, StoreOptions};

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("ITERATIONS must be a number"))
        .unwrap_or(2000);
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let root = dir.path().join("secrets");
    let store = Store::open(&root, &StoreOptions::default()).expect("opening the store");

    let names: Vec<String> = (0..10).map(|i| format!("secret_{i}")).collect();
    let value = vec![0x42u8; 1024];
    let files: Vec<FileSpec<'_>> = names
        .iter()
        .map(|name| FileSpec {
            name,
            value: &value,
            mode: 0o400,
            uid: 1000,
            gid: 1000,
        })
        .collect();

    let (mut fresh, mut replace, mut wipe) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..iterations {
        let instance = format!("bench-{i}");
        let start = Instant::now();
        store.write_group(&instance, "f0", &files, true).unwrap();
        fresh.push(start.elapsed());
        let start = Instant::now();
        store.write_group(&instance, "f0", &files, true).unwrap();
        replace.push(start.elapsed());
        let start = Instant::now();
        store.wipe(&instance).unwrap();
        wipe.push(start.elapsed());
    }
    drop(store);
    nix::mount::umount2(&root, nix::mount::MntFlags::MNT_DETACH).expect("unmounting");

    println!(
        "{iterations} iterations, 10 files x 1 KiB, tmpfs at {}",
        root.display()
    );
    report("write_group (new instance)", &mut fresh);
    report("write_group (replace)", &mut replace);
    report("wipe", &mut wipe);
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "{what:28} median {:>8.1?}  p99 {:>8.1?}  max {:>8.1?}",
        at(0.5),
        at(0.99),
        samples[samples.len() - 1]
    );
}
