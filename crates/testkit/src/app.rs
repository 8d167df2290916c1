//! Runs one `mqc-kit` subcommand: the two downstreams until SIGTERM / SIGINT, the traffic
//! generator against a validated daemon config.

use anyhow::Context as _;
use mq_cutover::config::{LogConfig, Validated};

use crate::grant_counter::GrantCounterArgs;
use crate::produce::ProduceArgs;
use crate::reward::RewardArgs;

/// `reward-service`: the demo downstream, until SIGTERM / SIGINT.
pub async fn reward_service(args: RewardArgs) -> anyhow::Result<()> {
    let root = mq_cutover::shutdown::root_token().context("installing signal handlers")?;
    mq_cutover::telemetry::logs::init(&LogConfig::default());
    crate::reward::run(args, root).await
}

/// `grant-counter`: the benchmark's downstream, until SIGTERM / SIGINT.
pub async fn grant_counter(args: GrantCounterArgs) -> anyhow::Result<()> {
    let root = mq_cutover::shutdown::root_token().context("installing signal handlers")?;
    mq_cutover::telemetry::logs::init(&LogConfig::default());
    crate::grant_counter::run(args, root).await
}

/// `produce`: dual-writes the traffic `args` describes and prints what went to each side.
pub async fn produce(cfg: Validated, args: ProduceArgs) -> anyhow::Result<()> {
    mq_cutover::telemetry::logs::init(&cfg.log);
    let (old, new) = crate::produce::produce(&cfg, &args).await?;
    println!(
        "sent {} ids: {} (old) {} copies, {} duplicated, {} missing; {} (new) {} copies, {} duplicated, {} missing; {} malformed per side",
        args.count, cfg.cutover.from, old.copies, old.duplicated, old.missing,
        cfg.cutover.to, new.copies, new.duplicated, new.missing, args.malformed
    );
    Ok(())
}
