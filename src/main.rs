//! The `mq-cutover` binary: parse the command line, load and validate the config, run.

use clap::Parser;
use mq_cutover::cli::{Cli, EXIT_CONFIG, EXIT_RUNTIME, EXIT_USAGE};
use mq_cutover::config::Config;

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
    if let Err(e) = mq_cutover::app::execute(cli.command, cfg).await {
        eprintln!("mq-cutover: {e:#}");
        std::process::exit(EXIT_RUNTIME);
    }
}
