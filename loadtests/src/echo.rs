//! A loopback echo server.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;

pub async fn run(listen: SocketAddr, max_seconds: u64) -> anyhow::Result<()> {
    let socket = TcpListener::bind(listen).await?;
    let serve = async {
        loop {
            let Ok((mut s, _)) = socket.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    };
    tokio::select! {
        () = serve => {}
        () = tokio::time::sleep(Duration::from_secs(max_seconds)) => {}
    }
    Ok(())
}
