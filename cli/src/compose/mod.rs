//! `dso up` / `dso down`: Compose projects whose `environment:` holds `dso://` and
//! `dsofile://` references (docs/compose.md).
//!
//! - `prepare.rs`: one service's delivery before Compose creates it: its files written to
//!   the store, the binds, entrypoint and variables of the override. The agent runs it for
//!   `POST /v1/compose/prepare`; `dso up` in local mode runs it itself.

// Used by `dso up` and `POST /v1/compose/prepare` (issue 11 work in progress).
#[allow(dead_code)]
pub mod prepare;
