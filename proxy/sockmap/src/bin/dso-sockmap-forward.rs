//! A minimal TCP forwarder on the sockmap fast path, for measurements against dso's
//! user-space path and HAProxy (loadtests/sockmap.sh). Not the proxy: no routes, drains or
//! holds. The accept loop dials, joins both legs and hands them to one watcher thread,
//! which sleeps in epoll until a leg reports end of stream or an error (never for the
//! bytes the kernel moves), passes a FIN on once the redirected bytes are settled, and
//! closes a connection when both ways have ended.
//!
//! `dso-sockmap-forward LISTEN BACKEND` forwards; `dso-sockmap-forward --probe` prints
//! `available` or `sockmap fast path not available: <reason>` (exit 1).

use std::collections::HashMap;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dso_sockmap::{EndWatch, FastPath, Joined};

/// One forwarded connection: its legs, its place in the fast path, which ways have ended.
struct Conn {
    client: TcpStream,
    server: TcpStream,
    joined: Joined<'static>,
    /// Per side (0 client, 1 server): its FIN has been passed on.
    ended: [bool; 2],
}

type Table = Arc<Mutex<HashMap<u64, Conn>>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fast: &'static FastPath = match FastPath::new(65_536) {
        Ok(f) => Box::leak(Box::new(f)),
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
    let watch = Arc::new(EndWatch::new().expect("epoll"));
    let table: Table = Arc::default();
    {
        let (watch, table) = (watch.clone(), table.clone());
        thread::spawn(move || watcher(&watch, &table));
    }
    let mut next = 0u64;
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        next += 1;
        if let Err(e) = open(fast, &watch, &table, next, client, backend) {
            eprintln!("connection: {e}");
        }
    }
    ExitCode::SUCCESS
}

fn open(
    fast: &'static FastPath,
    watch: &EndWatch,
    table: &Table,
    id: u64,
    client: TcpStream,
    backend: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let server = TcpStream::connect(backend)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let joined = fast.join(&client, &server)?;
    watch.add(&client, id << 1)?;
    watch.add(&server, (id << 1) | 1)?;
    let conn = Conn {
        client,
        server,
        joined,
        ended: [false; 2],
    };
    table.lock().unwrap_or_else(|p| p.into_inner()).insert(id, conn);
    Ok(())
}

fn watcher(watch: &EndWatch, table: &Table) {
    loop {
        let Ok(ends) = watch.wait(None) else { continue };
        for end in ends {
            let (id, side) = (end.token >> 1, (end.token & 1) as usize);
            let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
            let Some(c) = t.get_mut(&id) else { continue };
            if end.error {
                let _ = c.client.shutdown(Shutdown::Both);
                let _ = c.server.shutdown(Shutdown::Both);
                t.remove(&id);
                continue;
            }
            if c.ended[side] {
                continue;
            }
            // Pass the FIN on only once every redirected byte is in the other leg's send
            // queue (bounded: 10 s), or it would overtake them.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !c.joined.moved(&c.client, &c.server).is_ok_and(|m| m.settled())
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(1));
            }
            let to = if side == 0 { &c.server } else { &c.client };
            let _ = to.shutdown(Shutdown::Write);
            c.ended[side] = true;
            if c.ended == [true; 2] {
                t.remove(&id);
            }
        }
    }
}
