//! `dso-load`: the Rust side of the load tests in `loadtests/`.
//!
//! - `proxy`: runs a `dso-proxy` listener (release build, the same library the agent uses)
//!   with a line-based control port on loopback, so scripts can swap, pause and resume and
//!   every event is logged with its wall-clock time (to split latencies into swap windows).
//! - `echo`: a loopback echo server, the backend of the connection-rate and memory tests.
//! - `connrate`: short-lived connections per second with connect and first-byte latency.
//! - `pingpong`: small round trips on persistent connections, a fixed number of them.
//! - `idle`: opens N proxied connections, checks each end to end, then keeps them idle.
//!
//! Every command is bounded in time and touches loopback only; the scripts stop what they
//! start.

mod connrate;
mod control;
mod echo;
mod idle;
mod pingpong;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Load-test helpers for dso (loopback only, bounded in time)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one dso listener with a control port (commands below, one per connection):
    /// `swap ADDR[,ADDR...] [DRAIN_MS]`, `pause [MAX_MS]`, `resume`, `stats`, `quit`.
    Proxy {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Initial backends.
        #[arg(long, required = true, num_args = 1..)]
        backend: Vec<SocketAddr>,
        /// Default drain deadline of a swap, milliseconds.
        #[arg(long, default_value_t = 30_000)]
        drain_ms: u64,
        /// Longest hold, milliseconds.
        #[arg(long, default_value_t = 30_000)]
        hold_max_ms: u64,
        /// Control port address (loopback).
        #[arg(long)]
        control: SocketAddr,
        /// CSV file of control events: `epoch_us,event,detail`.
        #[arg(long)]
        events: PathBuf,
        /// Tokio worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Quit by itself after this many seconds (a bound, in case a script dies).
        #[arg(long, default_value_t = 3600)]
        max_seconds: u64,
    },
    /// Echo every byte back until the peer closes.
    Echo {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Quit by itself after this many seconds.
        #[arg(long, default_value_t = 3600)]
        max_seconds: u64,
    },
    /// Open, ping (1 byte echoed) and close connections as fast as `concurrency` workers can.
    Connrate {
        /// Where to connect.
        #[arg(long)]
        target: SocketAddr,
        /// How long to run, seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Parallel workers.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Label for the CSV line printed at the end.
        #[arg(long, default_value = "target")]
        label: String,
    },
    /// Persistent connections, each making `count` round trips of `size` bytes to an echo
    /// server (through the target), one at a time.
    Pingpong {
        /// Where to connect.
        #[arg(long)]
        target: SocketAddr,
        /// Parallel connections.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Round trips per connection.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Bytes sent (and echoed) per round trip.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Label for the CSV line printed at the end.
        #[arg(long, default_value = "target")]
        label: String,
    },
    /// Open `count` connections, check each echoes one byte, keep them idle.
    Idle {
        /// Where to connect.
        #[arg(long)]
        target: SocketAddr,
        /// Connections to open.
        #[arg(long)]
        count: usize,
        /// File created once every connection is open and checked.
        #[arg(long)]
        ready_file: PathBuf,
        /// Keep the connections this many seconds, then close them and exit.
        #[arg(long, default_value_t = 60)]
        hold_seconds: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Proxy {
            listen,
            backend,
            drain_ms,
            hold_max_ms,
            control,
            events,
            threads,
            max_seconds,
        } => runtime(threads)?.block_on(control::run(control::Options {
            listen,
            backends: backend,
            drain_ms,
            hold_max_ms,
            control,
            events,
            max_seconds,
        })),
        Cmd::Echo { listen, max_seconds } => runtime(2)?.block_on(echo::run(listen, max_seconds)),
        Cmd::Connrate {
            target,
            seconds,
            concurrency,
            label,
        } => runtime(2)?.block_on(connrate::run(target, seconds, concurrency, &label)),
        Cmd::Pingpong {
            target,
            connections,
            count,
            size,
            label,
        } => runtime(2)?.block_on(pingpong::run(target, connections, count, size, &label)),
        Cmd::Idle {
            target,
            count,
            ready_file,
            hold_seconds,
        } => runtime(2)?.block_on(idle::run(target, count, &ready_file, hold_seconds)),
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?)
}
