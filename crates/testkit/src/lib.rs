//! mqc-testkit: what mq-cutover's tests, demo and benchmark need and operators never run, kept
//! out of the daemon's binary and image.
//!
//! [`reward`] is the fake downstream with injected faults (the demo's sink and the end-to-end
//! tests' ledger of grants), [`grant_counter`] the lean downstream the benchmark forwards to, and
//! [`produce`] the dual-write traffic generator, which reads the daemon's config and writes with
//! its broker writers. The `mqc-kit` binary runs each as a subcommand ([`cli`], [`app`]); the
//! integration tests use the library in-process.
#![forbid(unsafe_code)]
// The traffic generator awaits rocketmq-client-rust's producer futures, which nest deeper than
// the compiler's default query depth when proven `Send`; the daemon's lib sets the same limit
// (mxsm/rocketmq-rust#3696).
#![recursion_limit = "256"]

pub mod app;
pub mod cli;
pub mod grant_counter;
pub mod produce;
pub mod reward;
