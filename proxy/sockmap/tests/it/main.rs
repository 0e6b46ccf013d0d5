//! What the kernel does with two proxied legs in the sockmap fast path, on real loopback
//! sockets: exact bytes both ways, bytes that waited before the join, half-close and the
//! order it needs, backpressure, leaving the fast path, forced close. Each test is one fact
//! docs/proxy.md relies on.
//!
//! These tests need root (or CAP_BPF + CAP_NET_ADMIN); without it they fail with the
//! kernel's reason rather than pass silently.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use dso_sockmap::{FastPath, Joined, Moved};

/// A connected pair of loopback sockets, with TCP_NODELAY as the proxy sets it.
fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}

/// client <-> (pa | pb) <-> server: `pa` and `pb` are the proxy's two legs.
struct Conn {
    client: TcpStream,
    pa: TcpStream,
    pb: TcpStream,
    server: TcpStream,
}

fn conn() -> Conn {
    let (client, pa) = pair();
    let (pb, server) = pair();
    Conn {
        client,
        pa,
        pb,
        server,
    }
}

fn fast() -> FastPath {
    FastPath::new(1024).unwrap_or_else(|e| panic!("these tests need root or CAP_BPF: {e}"))
}

fn data(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn read_exact_timeout(s: &mut TcpStream, len: usize, timeout: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("reading {len} bytes: {e}"));
    buf
}

fn wait_settled(j: &Joined<'_>, c: &Conn, within: Duration) -> Moved {
    let end = Instant::now() + within;
    loop {
        let m = j.moved(&c.pa, &c.pb).unwrap();
        if m.settled() || Instant::now() > end {
            return m;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Small messages both ways, like a database's queries and replies, arrive intact, and the
/// program's counters and the sockets' TCP_INFO agree with what was sent.
#[test]
fn round_trips_are_exact_and_counted() {
    let f = fast();
    let mut c = conn();
    let j = f.join(&c.pa, &c.pb).unwrap();
    let mut sent = 0;
    for i in 0..200u32 {
        let q = data(50 + i as usize, i);
        c.client.write_all(&q).unwrap();
        assert_eq!(
            read_exact_timeout(&mut c.server, q.len(), Duration::from_secs(5)),
            q
        );
        let r = data(300 + i as usize, i + 7);
        c.server.write_all(&r).unwrap();
        assert_eq!(
            read_exact_timeout(&mut c.client, r.len(), Duration::from_secs(5)),
            r
        );
        sent += q.len() as u64;
    }
    let m = wait_settled(&j, &c, Duration::from_secs(2));
    let up: u64 = (0..200).map(|i| 50 + i).sum();
    let down: u64 = (0..200).map(|i| 300 + i).sum();
    assert_eq!(sent, up);
    assert_eq!(
        m,
        Moved {
            a_to_b: up,
            b_to_a: down,
            into_b: up,
            into_a: down
        }
    );
}

/// Bytes the client sent before the join (a PostgreSQL startup packet waiting in the
/// proxy's receive queue) are forwarded by the join's kick; without it they would wait
/// for the next segment, which a client waiting for a reply never sends.
#[test]
fn bytes_waiting_before_the_join_are_forwarded() {
    let f = fast();
    let mut c = conn();
    let early = data(1000, 1);
    c.client.write_all(&early).unwrap();
    thread::sleep(Duration::from_millis(50));
    let _j = f.join(&c.pa, &c.pb).unwrap();
    assert_eq!(
        read_exact_timeout(&mut c.server, early.len(), Duration::from_secs(2)),
        early
    );
}

/// A client's FIN reaches user space as end of stream on the proxy's leg (the kernel does
/// not pass it on by itself); the proxy passes it on with shutdown(SHUT_WR) once the
/// redirected bytes are settled, and the other direction keeps flowing.
#[test]
fn half_close_is_seen_by_user_space_and_passed_on() {
    let f = fast();
    let mut c = conn();
    let j = f.join(&c.pa, &c.pb).unwrap();
    let q = data(5000, 3);
    c.client.write_all(&q).unwrap();
    c.client.shutdown(Shutdown::Write).unwrap();
    // The proxy's leg reads end of stream, and never any of the redirected bytes.
    c.pa.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        c.pa.read(&mut buf).unwrap(),
        0,
        "the proxy sees the client's FIN as end of stream"
    );
    let m = wait_settled(&j, &c, Duration::from_secs(2));
    assert!(m.settled(), "{m:?}");
    c.pb.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.server.read_to_end(&mut got).unwrap();
    assert!(got == q, "the server got {} of {} bytes", got.len(), q.len());
    // The server's reply still flows to the half-closed client.
    let r = data(7000, 4);
    c.server.write_all(&r).unwrap();
    assert_eq!(
        read_exact_timeout(&mut c.client, r.len(), Duration::from_secs(5)),
        r
    );
    c.server.shutdown(Shutdown::Write).unwrap();
    assert_eq!(c.pb.read(&mut buf).unwrap(), 0);
    let m = wait_settled(&j, &c, Duration::from_secs(2));
    assert_eq!((m.a_to_b, m.b_to_a), (q.len() as u64, r.len() as u64));
    // The FIN passed on to the server's leg counts one there; still settled.
    assert!(m.settled() && m.into_b == q.len() as u64 + 1, "{m:?}");
    c.pa.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

/// A slow reader does NOT push back (kernel 6.18): with the server not reading, the
/// redirect queue of the server's leg takes everything the client sends, far past every
/// socket buffer limit (`tcp_rmem` max 32 MiB, `tcp_wmem` max 4 MiB here): the client's
/// 64 MiB are all accepted while the server's leg holds about 4 MiB in its send queue. The
/// bytes still arrive intact and in order once the server reads. This is the fact that
/// keeps the fast path out of the proxy (docs/proxy.md): a client uploading to a slow
/// backend would pin unbounded kernel memory. If a kernel ever bounds it, this test fails
/// and the decision should be revisited.
#[test]
fn a_slow_reader_does_not_push_back() {
    let f = fast();
    let c = conn();
    let j = f.join(&c.pa, &c.pb).unwrap();
    let total = 64 << 20;
    let payload = data(total, 9);
    let mut w = c.client.try_clone().unwrap();
    let p2 = payload.clone();
    let writer = thread::spawn(move || {
        w.write_all(&p2).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let end = Instant::now() + Duration::from_secs(10);
    while !writer.is_finished() && Instant::now() < end {
        thread::sleep(Duration::from_millis(10));
    }
    let m = j.moved(&c.pa, &c.pb).unwrap();
    eprintln!("server not reading: {m:?}");
    assert!(writer.is_finished(), "the client's writes were held back: {m:?}");
    assert_eq!(m.a_to_b, total as u64, "everything was redirected");
    let queued = m.a_to_b - m.into_b;
    assert!(
        queued > 36 << 20,
        "only {queued} bytes wait in the redirect queue"
    );
    let mut got = Vec::with_capacity(total);
    let mut server = c.server.try_clone().unwrap();
    server.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    while got.len() < total {
        let n = server.read(&mut buf).unwrap();
        assert!(n > 0, "end of stream after {} of {total} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got == payload, "bytes altered or reordered");
    let m = wait_settled(&j, &c, Duration::from_secs(2));
    assert_eq!((m.a_to_b, m.into_b), (total as u64, total as u64));
}

/// The order matters: with the reader slow, the client's FIN reaches the proxy's leg while
/// bytes still wait in the redirect queue (`settled` is false). A half-close passed on at
/// that moment would put the FIN ahead of them and the kernel would drop them: the proxy
/// must wait for `settled` (or its drain deadline) first.
#[test]
fn end_of_stream_can_arrive_before_the_bytes_are_settled() {
    let f = fast();
    let mut c = conn();
    let j = f.join(&c.pa, &c.pb).unwrap();
    let payload = data(8 << 20, 5);
    let mut w = c.client.try_clone().unwrap();
    let p2 = payload.clone();
    let writer = thread::spawn(move || {
        w.write_all(&p2).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    // Read slowly enough that the redirect queue fills, until the proxy leg sees the FIN.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    c.server.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.pa.set_nonblocking(true).unwrap();
    let mut unsettled_at_eof = None;
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        let mut b = [0u8; 16];
        match c.pa.read(&mut b) {
            Ok(0) => {
                unsettled_at_eof = Some(j.moved(&c.pa, &c.pb).unwrap());
                break;
            }
            Ok(n) => panic!("user space read {n} redirected bytes"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        let n = c.server.read(&mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
        thread::sleep(Duration::from_millis(2));
    }
    writer.join().unwrap();
    let m = unsettled_at_eof.expect("end of stream seen");
    eprintln!("at end of stream: {m:?}, the server had {} bytes", got.len());
    assert!(
        !m.settled(),
        "at end of stream all bytes were already settled: {m:?}"
    );
    // Waiting for `settled` and then half-closing delivers everything.
    let rest = thread::spawn(move || {
        let mut rest = Vec::new();
        c.server.read_to_end(&mut rest).unwrap();
        (c.server, rest)
    });
    let end = Instant::now() + Duration::from_secs(10);
    while !j.moved(&c.pa, &c.pb).unwrap().settled() && Instant::now() < end {
        thread::sleep(Duration::from_millis(1));
    }
    c.pb.shutdown(Shutdown::Write).unwrap();
    let (_server, rest) = rest.join().unwrap();
    got.extend_from_slice(&rest);
    assert!(got == payload, "got {} of {} bytes", got.len(), payload.len());
}

/// Leaving the fast path gives the sockets back to user space: once settled and out of the
/// maps, bytes that arrive are read by the proxy's leg again, nothing is lost or doubled.
#[test]
fn leaving_returns_the_sockets_to_user_space() {
    let f = fast();
    let mut c = conn();
    let j = f.join(&c.pa, &c.pb).unwrap();
    let q = data(3000, 11);
    c.client.write_all(&q).unwrap();
    assert_eq!(
        read_exact_timeout(&mut c.server, q.len(), Duration::from_secs(5)),
        q
    );
    assert!(wait_settled(&j, &c, Duration::from_secs(2)).settled());
    j.leave().unwrap();
    let q2 = data(2000, 12);
    c.client.write_all(&q2).unwrap();
    assert_eq!(
        read_exact_timeout(&mut c.pa, q2.len(), Duration::from_secs(5)),
        q2
    );
}

/// A forced close (drain deadline, second signal) works as on the user-space path: out of
/// the maps, then shutdown of both legs; both ends see end of stream. Closing a socket
/// also takes it out of the maps by itself (a new join with the same map room works).
#[test]
fn forced_close_ends_both_sides() {
    let f = fast();
    let mut c = conn();
    let j = f.join(&c.pa, &c.pb).unwrap();
    c.client.write_all(b"ping").unwrap();
    assert_eq!(
        read_exact_timeout(&mut c.server, 4, Duration::from_secs(5)),
        b"ping"
    );
    drop(j);
    c.pa.shutdown(Shutdown::Both).unwrap();
    c.pb.shutdown(Shutdown::Both).unwrap();
    let mut buf = [0u8; 8];
    c.client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(c.client.read(&mut buf).unwrap(), 0);
    assert_eq!(c.server.read(&mut buf).unwrap(), 0);
    // Sockets closed while in the maps, then their handle dropped: 600 connections (1,200
    // sockets) pass through maps with room for 1,024, so nothing is left behind.
    for _ in 0..600 {
        let c = conn();
        let j = f.join(&c.pa, &c.pb).unwrap();
        drop(c);
        drop(j);
    }
}

/// Without the permission the fast path reports why, and nothing else happens: the
/// example forwarder run as `nobody` prints the kernel's reason.
#[test]
fn without_permission_the_reason_is_reported() {
    let exe = env!("CARGO_BIN_EXE_dso-sockmap-forward");
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            exe,
            "--probe",
        ])
        .output()
        .expect("setpriv runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.starts_with("sockmap fast path not available: "), "{text}");
    eprintln!("{text}");
}

/// What happens without that wait: a half-close passed on as soon as end of stream is read
/// puts the FIN ahead of the bytes still in the redirect queue, and the server gets a
/// truncated stream that looks complete.
#[test]
fn a_half_close_before_settled_truncates_the_stream() {
    let f = fast();
    let c = conn();
    let j = f.join(&c.pa, &c.pb).unwrap();
    let total = 16 << 20;
    let payload = data(total, 21);
    let mut w = c.client.try_clone().unwrap();
    let p2 = payload.clone();
    let writer = thread::spawn(move || {
        w.write_all(&p2).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    // The server does not read yet: everything waits in the kernel when the FIN arrives.
    let mut pa = c.pa.try_clone().unwrap();
    pa.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut wakeups = 0;
    loop {
        match pa.read(&mut [0u8; 16]) {
            Ok(0) => break,
            Ok(n) => panic!("user space read {n} redirected bytes"),
            // A blocking read on a leg in the map returns EAGAIN each time redirected data
            // wakes it (tcp_bpf_recvmsg), long before its timeout.
            Err(e) if e.kind() == ErrorKind::WouldBlock && wakeups < 100_000 => wakeups += 1,
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!("{wakeups} EAGAIN returns from a blocking read before end of stream");
    let at_eof = j.moved(&c.pa, &c.pb).unwrap();
    c.pb.shutdown(Shutdown::Write).unwrap();
    writer.join().unwrap();
    let mut got = Vec::new();
    let mut server = c.server.try_clone().unwrap();
    server.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    server.read_to_end(&mut got).unwrap();
    eprintln!(
        "at end of stream {at_eof:?}; the server got {} of {total} bytes and then end of stream",
        got.len()
    );
    assert!(!at_eof.settled());
    assert!(got.len() < total, "the server got every byte");
    assert!(got[..] == payload[..got.len()], "what arrived is a prefix");
}

/// The end-of-stream watch sleeps through the bytes the kernel moves (interest only in
/// `EPOLLRDHUP`: 100 round trips, no event) and wakes for the FIN, then for a reset with
/// `error`.
#[test]
fn the_end_watch_wakes_for_fin_and_reset_only() {
    let f = fast();
    let mut c = conn();
    let j = f.join(&c.pa, &c.pb).unwrap();
    let w = dso_sockmap::EndWatch::new().unwrap();
    w.add(&c.pa, 10).unwrap();
    w.add(&c.pb, 11).unwrap();
    for i in 0..100u32 {
        let q = data(100, i);
        c.client.write_all(&q).unwrap();
        assert_eq!(
            read_exact_timeout(&mut c.server, q.len(), Duration::from_secs(5)),
            q
        );
        c.server.write_all(&q).unwrap();
        assert_eq!(
            read_exact_timeout(&mut c.client, q.len(), Duration::from_secs(5)),
            q
        );
    }
    assert_eq!(
        w.wait(Some(Duration::ZERO)).unwrap(),
        vec![],
        "woken by redirected bytes"
    );
    c.client.shutdown(Shutdown::Write).unwrap();
    let ends = w.wait(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        ends,
        vec![dso_sockmap::End {
            token: 10,
            error: false
        }]
    );
    // The FIN is not redirected (the program passes empty chunks): redirected, the
    // kernel's zero-byte send set EPIPE on the server's healthy leg (seen before the fix).
    assert!(
        c.pb.take_error().unwrap().is_none(),
        "the server's leg got an error from the client's FIN"
    );
    assert!(wait_settled(&j, &c, Duration::from_secs(2)).settled());
    // A reset from the server: SO_LINGER 0 then close.
    let server = socket2::Socket::from(c.server);
    server.set_linger(Some(Duration::ZERO)).unwrap();
    drop(server);
    let ends = w.wait(Some(Duration::from_secs(5))).unwrap();
    // The client's leg may be reported again (edge-triggered epoll reports a socket anew
    // at each wake-up of its queue while its condition holds): handling must be idempotent.
    assert!(
        ends.contains(&dso_sockmap::End {
            token: 11,
            error: true
        }),
        "{ends:?}"
    );
    assert!(ends.iter().all(|e| e.token == 11 || e.token == 10), "{ends:?}");
}
