//! The in-memory archive (work in progress, issue 10).
