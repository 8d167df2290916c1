//! The `mqc-kit` binary: parse the command line, run one tool (loading the daemon's config for
//! `produce` only).

use clap::Parser;
use mq_cutover::cli::{EXIT_CONFIG, EXIT_RUNTIME, EXIT_USAGE};
use mq_cutover::config::Config;
use mqc_testkit::cli::{Cli, Command};

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
    let done = match cli.command {
        Command::RewardService(args) => mqc_testkit::app::reward_service(args).await,
        Command::GrantCounter(args) => mqc_testkit::app::grant_counter(args).await,
        Command::Produce(args) => match Config::load(&cli.config).and_then(Config::validate) {
            Ok(cfg) => mqc_testkit::app::produce(cfg, args).await,
            Err(e) => {
                eprintln!("mqc-kit: {e}");
                std::process::exit(EXIT_CONFIG);
            }
        },
    };
    if let Err(e) = done {
        eprintln!("mqc-kit: {e:#}");
        std::process::exit(EXIT_RUNTIME);
    }
}
