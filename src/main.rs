//! The `mq-cutover` binary: parse the command line, load and validate the config, run.

use clap::Parser;
use mq_cutover::cli::{Cli, EXIT_CONFIG, EXIT_RUNTIME, EXIT_USAGE};
use mq_cutover::config::Config;

/// mimalloc instead of the system allocator: the claim and call path allocates many small,
/// short-lived buffers, and glibc's `malloc`/`free` were about a sixth of the daemon's CPU time
/// in the benchmark's profile (docs/benchmarks.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            let _ = e.print();
            std::process::exit(EXIT_USAGE);
        }
    };
    let cfg = match Config::load(&cli.config).and_then(Config::validate) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("mq-cutover: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    };
    mq_cutover::telemetry::logs::init(&cfg.log);
    exit_on(mq_cutover::app::execute(cli.command, cfg).await);
}

fn exit_on(r: anyhow::Result<()>) {
    if let Err(e) = r {
        eprintln!("mq-cutover: {e:#}");
        std::process::exit(EXIT_RUNTIME);
    }
}
