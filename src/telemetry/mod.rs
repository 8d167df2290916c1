//! Telemetry: structured logs now; metrics and events join as the data path grows.

pub mod logs;
