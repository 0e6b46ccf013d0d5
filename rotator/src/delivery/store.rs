//! The tmpfs store (work in progress, issue 10).
