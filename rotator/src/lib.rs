//! `dso-rotator`: the Docker side of dso.
//!
//! It finds containers labelled `dso.reloader=true`, owns their host ports through the
//! `dso-proxy` listeners, and replaces containers without a failed connection.
//!
//! Where to start reading: [`Rotator`] (`rotator.rs`) is what the agent holds: start
//! (recovery, then adoption), `rotate`; `watch.rs` follows Docker events and `status.rs`
//! answers `dso status`. `rotate` hands each container to a strategy: `rolling.rs`
//! (blue-green behind the proxy) or `restart.rs` (hold, replace, resume), each a state
//! machine over [`journal::Step`] sharing the context in `rotation.rs`. Each step is written to the [`journal`] before the next
//! action; [`recovery`] finishes interrupted rotations from it. `health.rs` decides when
//! a new container serves; `gateway.rs` maps services to proxy listeners; `discovery.rs`
//! and `labels.rs` turn containers into services; `lock.rs` keeps one rotation per service.
//! Every Docker call is in [`engine`], behind the [`Engine`] trait.

pub mod counts;
pub mod delivery;
mod discovery;
pub mod engine;
mod error;
#[cfg(test)]
mod fake;
mod gateway;
mod health;
pub mod journal;
pub mod labels;
mod lock;
mod network;
pub mod recovery;
mod restart;
mod rolling;
mod rotation;
mod rotator;
mod status;
mod strategy;
mod watch;

pub use discovery::{Managed, Scan};
pub use engine::{Container, DockerEngine, Engine, EngineError};
pub use error::Error;
pub use gateway::{Gateway, Member, listener_name};
pub use health::HealthCheck;
pub use labels::{PortMap, ServiceKey, ServiceSpec, Strategy};
pub use lock::{Queue, ServiceLock};
pub use rotation::{ContainerReport, Hooks, Progress};
pub use rotator::{Config, RotateRequest, RotationReport, Rotator};
pub use status::ServiceStatus;
pub use strategy::{resolve as resolve_strategy, stateful_reason};
