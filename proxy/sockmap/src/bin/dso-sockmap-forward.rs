//! A minimal TCP forwarder on the sockmap fast path, for measurements against dso's
//! user-space path and HAProxy (loadtests/sockmap.sh). Not the proxy: no routes, drains or
//! holds, one thread per connection that only waits for end of stream.
//!
//! `dso-sockmap-forward LISTEN BACKEND` forwards; `dso-sockmap-forward --probe` prints
//! `available` or `not available: <reason>` (exit 1).

use std::io::{ErrorKind, Read};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use dso_sockmap::{FastPath, Joined};

/// Reads of a leg that returned EAGAIN (spurious wake-ups), printed every 10 s when
/// changed.
static WAKEUPS: AtomicU64 = AtomicU64::new(0);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fast = match FastPath::new(65_536) {
        Ok(f) => &*Box::leak(Box::new(f)),
        Err(e) => {
            println!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if args.first().map(String::as_str) == Some("--probe") {
        println!("available");
        return ExitCode::SUCCESS;
    }
    let [listen, backend] = args.as_slice() else {
        eprintln!("usage: dso-sockmap-forward LISTEN BACKEND | --probe");
        return ExitCode::from(2);
    };
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("binding {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    thread::spawn(|| {
        let mut last = 0;
        loop {
            thread::sleep(Duration::from_secs(10));
            let now = WAKEUPS.load(Ordering::Relaxed);
            if now != last {
                eprintln!("spurious wake-ups so far: {now}");
                last = now;
            }
        }
    });
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let backend = backend.clone();
        thread::spawn(move || {
            if let Err(e) = serve(fast, client, &backend) {
                eprintln!("connection: {e}");
            }
        });
    }
    ExitCode::SUCCESS
}

fn serve(fast: &FastPath, client: TcpStream, backend: &str) -> Result<(), Box<dyn std::error::Error>> {
    let server = TcpStream::connect(backend)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let joined = fast.join(&client, &server)?;
    thread::scope(|s| {
        s.spawn(|| half(&joined, &client, &server, &client, &server));
        s.spawn(|| half(&joined, &client, &server, &server, &client));
    });
    drop(joined);
    Ok(())
}

/// Waits for end of stream on `from`, then passes it on to `to` once every redirected byte
/// is in `to`'s send queue (bounded: 10 s).
fn half(j: &Joined<'_>, a: &TcpStream, b: &TcpStream, mut from: &TcpStream, to: &TcpStream) {
    let mut buf = [0u8; 4096];
    // A blocking read on a leg in the map returns EAGAIN whenever redirected data wakes it
    // (tcp_bpf_recvmsg): read again. Counted, to show what that costs.
    let r = loop {
        match from.read(&mut buf) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                WAKEUPS.fetch_add(1, Ordering::Relaxed);
            }
            r => break r,
        }
    };
    match r {
        Ok(0) => {
            let end = Instant::now() + Duration::from_secs(10);
            while !j.moved(a, b).is_ok_and(|m| m.settled()) && Instant::now() < end {
                thread::sleep(Duration::from_millis(1));
            }
            let _ = to.shutdown(Shutdown::Write);
        }
        // Bytes for user space mean the peer left the maps; an error is a reset: end both.
        _ => {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}
