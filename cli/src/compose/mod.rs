//! `dso up` / `dso down`: Compose projects whose `environment:` holds `dso://` and
//! `dsofile://` references (docs/compose.md).
//!
//! - `project.rs`: the project the way Compose loads it (`-f`, `-p`, `COMPOSE_FILE`,
//!   `.env`, default names) and the model Compose prints (`config`).
//! - `service.rs`: one service of that model: its references, its ports as
//!   `dso.host_ports`, the facts prepare needs.
//! - `prepare.rs`: one service's delivery before Compose creates it: its files written to
//!   the store, the binds, entrypoint and variables of the override. The agent runs it for
//!   `POST /v1/compose/prepare`; `dso up` in local mode runs it itself.
//! - `override_.rs`: the changes written for Compose (a v2 override, or v1's merged model).
//! - `runner.rs`: which Compose (v1 or v2) and running it.

pub mod override_;
pub mod prepare;
pub mod project;
pub mod runner;
pub mod service;
