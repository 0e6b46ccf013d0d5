//! A counting HTTP forwarder on loopback between the SDK and moto_server.
//!
//! moto_server has no per-call counter, so every request the provider makes goes through
//! this forwarder, which counts it by its `X-Amz-Target` (`secretsmanager.DescribeSecret`)
//! and passes it on unchanged (headers included, so SigV4 still verifies at moto). It can
//! also answer the next N calls of one operation itself with an error in the exact shape
//! AWS sends for the JSON 1.1 protocol (status, `x-amzn-ErrorType`, `{"__type", "message"}`
//! body), for the cases moto cannot produce (throttling, 5xx).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// One injected answer.
#[derive(Clone)]
pub struct Fault {
    /// HTTP status.
    pub status: u16,
    /// Extra headers (e.g. `Retry-After`).
    pub headers: Vec<(String, String)>,
    /// AWS error code (`ThrottlingException`).
    pub code: String,
    /// AWS error message.
    pub message: String,
    /// A body to send instead of the AWS error document (a garbled answer).
    pub raw_body: Option<String>,
}

#[derive(Default)]
struct State {
    counts: HashMap<String, usize>,
    faults: HashMap<String, VecDeque<Fault>>,
}

/// The running forwarder; stops when dropped.
pub struct Forwarder {
    /// `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    /// Forwards to `upstream` (moto's `127.0.0.1:PORT`).
    pub async fn start(upstream: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind forwarder");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, upstream, st.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Forwarder { addr, state, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls of `operation` (`DescribeSecret`) seen so far, injected answers included.
    pub fn count(&self, operation: &str) -> usize {
        let target = format!("secretsmanager.{operation}");
        self.state
            .lock()
            .unwrap()
            .counts
            .get(&target)
            .copied()
            .unwrap_or(0)
    }

    /// Every operation seen and its count.
    pub fn counts(&self) -> HashMap<String, usize> {
        self.state.lock().unwrap().counts.clone()
    }

    /// Answers the next `times` calls of `operation` with `fault` instead of forwarding.
    pub fn fail_next(&self, operation: &str, times: usize, fault: Fault) {
        let target = format!("secretsmanager.{operation}");
        let mut st = self.state.lock().unwrap();
        let q = st.faults.entry(target).or_default();
        for _ in 0..times {
            q.push_back(fault.clone());
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    req: Request<Incoming>,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let target = req
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)")
        .to_string();
    let fault = {
        let mut st = state.lock().unwrap();
        *st.counts.entry(target.clone()).or_default() += 1;
        st.faults.get_mut(&target).and_then(VecDeque::pop_front)
    };
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    if let Some(f) = fault {
        let mut resp = Response::builder()
            .status(f.status)
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amzn-requestid", "00000000-0000-0000-0000-000000000000")
            .header("x-amzn-errortype", format!("{}:", f.code));
        for (k, v) in &f.headers {
            resp = resp.header(k, v);
        }
        let doc = serde_json::json!({"__type": f.code, "message": f.message}).to_string();
        let body = f.raw_body.unwrap_or(doc);
        return Ok(resp.body(Full::new(Bytes::from(body))).unwrap());
    }
    let stream = TcpStream::connect(upstream).await.expect("connect to moto");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
