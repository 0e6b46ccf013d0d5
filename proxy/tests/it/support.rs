//! Scenario helpers: tagged echo backends, a proxy in front of them, clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dso_proxy::{Backend, Listener, ListenerConfig, Proxy, ProxyConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// An echo server that first sends `tag\n`, so a client can tell which backend served it.
pub struct EchoBackend {
    pub addr: SocketAddr,
    pub tag: String,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl EchoBackend {
    pub async fn start(tag: &str) -> EchoBackend {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let greeting = format!("{tag}\n");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = socket.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    if s.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        EchoBackend {
            addr,
            tag: tag.to_owned(),
            accepted,
            task,
        }
    }

    pub fn backend(&self) -> Backend {
        Backend::new(self.addr)
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port on loopback where nothing listens: dials to it are refused.
pub async fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A listener config on an OS-chosen loopback port with short timeouts for tests.
pub fn config(name: &str, backends: &[Backend]) -> ListenerConfig {
    let mut cfg = ListenerConfig::new(name, "127.0.0.1:0".parse().unwrap(), backends.to_vec());
    cfg.close_window = Duration::from_millis(50);
    cfg
}

pub fn start(cfg: ListenerConfig) -> (Proxy, Listener) {
    let proxy = Proxy::new(ProxyConfig::default());
    let listener = proxy.add_listener(cfg).unwrap();
    (proxy, listener)
}

/// A client connection through the proxy, past the backend's greeting.
pub struct Client {
    pub tag: String,
    pub stream: BufReader<TcpStream>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        let mut stream = BufReader::new(stream);
        let mut tag = String::new();
        let n = stream.read_line(&mut tag).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before the greeting",
            ));
        }
        Ok(Client {
            tag: tag.trim_end().to_owned(),
            stream,
        })
    }

    /// Sends `data` and checks that exactly the same bytes come back.
    pub async fn echo(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.stream.get_mut().write_all(data).await?;
        let mut back = vec![0; data.len()];
        self.stream.read_exact(&mut back).await?;
        assert_eq!(back, data, "echoed bytes differ");
        Ok(())
    }

    /// Waits up to `within` for the proxy to close the connection.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, self.stream.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// Polls `cond` every 5 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Deterministic payload of `len` bytes, different per `seed`.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
