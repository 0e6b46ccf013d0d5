//! Integration tests of `dso-rotator` against the real Docker engine, with the
//! `dso-testsrv:test` image and the real `dso-proxy` in process. They fail (never skip)
//! when Docker or the image is missing, saying what to run.

mod clone;
mod crash;
mod engine;
mod lifecycle;
mod remote;
mod rotate;
mod support;
mod timing;
