//! The arbitration core on real Redis (standalone and a 3-master Redis Cluster).

#[path = "../common/mod.rs"]
mod common;
mod instances;
mod invariants;
mod letters;
mod memory;
mod model;
mod outage;
mod parity;
mod pipelined;
mod transitions;
mod waits;

use mq_cutover::config::{AmbiguousPolicy, RedisMode};

const IDS: u32 = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_at_least_once_seed_1() {
    invariants::run(RedisMode::Standalone, AmbiguousPolicy::AtLeastOnce, 1, IDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_at_least_once_seed_2() {
    invariants::run(RedisMode::Standalone, AmbiguousPolicy::AtLeastOnce, 2, IDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_at_least_once_seed_3() {
    invariants::run(RedisMode::Standalone, AmbiguousPolicy::AtLeastOnce, 3, IDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_at_most_once_seed_4() {
    invariants::run(RedisMode::Standalone, AmbiguousPolicy::AtMostOnce, 4, IDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_on_redis_cluster_at_least_once_seed_5() {
    invariants::run(RedisMode::Cluster, AmbiguousPolicy::AtLeastOnce, 5, IDS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants_hold_on_redis_cluster_at_most_once_seed_6() {
    invariants::run(RedisMode::Cluster, AmbiguousPolicy::AtMostOnce, 6, IDS).await;
}
