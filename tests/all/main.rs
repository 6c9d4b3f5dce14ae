//! End-to-end tests of Grid through its public interfaces: the `grid` binary and the sandbox API
//! of `grid-sandbox`. One test binary, one module per topic (wasmtime's `tests/all` layout).
//!
//! The guest modules they run are built to wasm32-wasip1 first: `cargo xtask test` does that and
//! then runs these tests; a missing guest fails the test with the command to run.

mod support;

mod auth;
mod cache;
mod cli;
mod cluster;
mod dashboard;
mod doctor;
mod examples;
mod gpu;
mod grid;
mod hostile;
mod ledger;
mod metrics;
mod packaging;
mod privileges;
mod python;
mod readme;
mod replicas;
mod results;
mod retry;
mod rogue;
mod sandbox;
mod storage;
mod wasi_testsuite;
