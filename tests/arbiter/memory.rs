//! Memory per id, measured with MEMORY USAGE on real Redis: the figure docs/arbiter.md quotes.

use std::time::Duration;

use mq_cutover::arbiter::{Arbiter, ClaimRequest, CompleteRequest, LeaseTokens, Outcome};
use mq_cutover::config::{AmbiguousPolicy, RedisMode};

use crate::common;

#[tokio::test]
async fn a_done_record_stays_under_256_bytes() {
    let prefix = common::unique_prefix("mem");
    let store = common::connect(RedisMode::Standalone, &prefix).await;
    let arbiter = Arbiter::new(
        &store,
        &common::arbiter_config(Duration::from_secs(30), AmbiguousPolicy::AtLeastOnce, 8),
    );
    let tokens = LeaseTokens::default();
    let mut sizes = Vec::new();
    for i in 0..200 {
        // A realistic id: a UUID, seen by both sides, delivered by its owner.
        let id = format!("{:032x}", rand::random::<u128>());
        let token = tokens.next();
        let req = ClaimRequest {
            id: &id,
            side: "kafka",
            routed_owner: "kafka",
            token: &token,
        };
        arbiter.claim(&req).await.unwrap();
        let other = tokens.next();
        let copy = ClaimRequest {
            id: &id,
            side: "rocketmq",
            routed_owner: "rocketmq",
            token: &other,
        };
        arbiter.claim(&copy).await.unwrap();
        arbiter
            .complete(&CompleteRequest {
                id: &id,
                side: "kafka",
                token: &token,
                outcome: &Outcome::Success,
            })
            .await
            .unwrap();
        if i % 10 == 0 {
            let mut conn = store.conn();
            let bytes: u64 = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(mq_cutover::arbiter::record_key(&prefix, &id))
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut conn)
                .await
                .unwrap();
            sizes.push(bytes);
        }
    }
    common::cleanup(&[common::redis_url()], &prefix);
    sizes.sort_unstable();
    let median = sizes[sizes.len() / 2];
    eprintln!(
        "memory per done id (32-hex id, two sides, MEMORY USAGE): median {median} bytes, max {}",
        sizes.last().unwrap()
    );
    assert!(median < 256, "a record takes {median} bytes");
}
