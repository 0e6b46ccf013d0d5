//! The TCP echo server: a greeting line naming the instance, then every byte back.
//!
//! The greeting is what lets a rotation test tell which container served a connection
//! through the proxy; MySQL-like "server speaks first" behaviour comes for free.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::state::State;

/// The line written first on every connection: `dso-testsrv <INSTANCE_ID>\n`.
pub fn greeting(state: &State) -> String {
    format!("dso-testsrv {}\n", state.instance_id())
}

/// Accepts connections until the task is dropped; each one is served on its own task.
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                tokio::spawn(handle(stream, state.clone()));
            }
            Err(e) => {
                // Usually EMFILE under a connection storm: back off instead of spinning.
                eprintln!("dso-testsrv: echo accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// Greets, then echoes until the client closes its side, then closes ours.
async fn handle(mut stream: TcpStream, state: Arc<State>) {
    let _ = stream.set_nodelay(true);
    if stream.write_all(greeting(&state).as_bytes()).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = stream.split();
    if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
        let _ = wr.shutdown().await;
    }
}
