//! The `mq-cutover` binary: parse the command line, load and validate the config, run.

use mq_cutover::cli::{config_or_exit, exit_on, parse_or_exit, Cli};

/// mimalloc instead of the system allocator: the claim and call path allocates many small,
/// short-lived buffers, and glibc's `malloc`/`free` were about a sixth of the daemon's CPU time
/// in the benchmark's profile (docs/benchmarks.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli: Cli = parse_or_exit();
    let cfg = config_or_exit("mq-cutover", &cli.config);
    mq_cutover::telemetry::logs::init(&cfg.log);
    exit_on(
        "mq-cutover",
        mq_cutover::app::execute(cli.command, cfg).await,
    );
}
