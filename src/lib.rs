//! mq-cutover moves a consumer from Apache Kafka to Apache RocketMQ (or back) with no downtime, no
//! double processing and no silent loss.
//!
//! Both brokers carry a copy of every message while producers dual-write. Each copy is offered to
//! the [`arbiter`], which keeps one small record per message id in Redis: the first side to see an
//! id decides, from the [`arbiter::switches`] of that moment, which side owns it; only the owner
//! calls the downstream sink, under a lease that fences out any other worker, and a failed call is
//! retried by the owner only. The switches (consume on/off, a percentage of business-id buckets, a
//! whitelist) live in Redis too, so every instance follows one operator command within a second.
//!
//! Modules, in data-path order: [`config`] (load the file, check what spans sections; each
//! section's struct and checks live with its component, on the error type of [`settings`];
//! [`secrets`] and [`tls`] for the credentials and certificates it names), [`store`] (the Redis
//! connection), [`arbiter`] (claim / complete / renew, routing, switches), [`control`] (the
//! operator actions shared by the CLI and, later, the admin API), [`app`] (wiring and the run
//! loop), with [`telemetry`] and [`shutdown`] beside them.
#![forbid(unsafe_code)]
// rocketmq-client-rust's futures nest deeper than the compiler's default query depth when they
// are proven `Send` (the RocketMQ source runs them on the daemon's runtime); upstream sets the
// same limit on its own crates (mxsm/rocketmq-rust#3696, #9144, #9150).
#![recursion_limit = "256"]

pub mod admin;
pub mod app;
pub mod arbiter;
pub mod cli;
pub mod config;
pub mod control;
pub mod dead;
#[cfg(test)]
pub(crate) mod fuzzing;
pub mod message;
pub mod parity;
pub mod pipeline;
pub mod printable;
pub mod secrets;
pub mod settings;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod tls;
