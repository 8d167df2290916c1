//! The `mqc-kit` binary: parse the command line, run one tool (loading the daemon's config for
//! `produce` only).

use mq_cutover::cli::{config_or_exit, exit_on, parse_or_exit};
use mqc_testkit::cli::{Cli, Command};

#[tokio::main]
async fn main() {
    let cli: Cli = parse_or_exit();
    let done = match cli.command {
        Command::RewardService(args) => mqc_testkit::app::reward_service(args).await,
        Command::GrantCounter(args) => mqc_testkit::app::grant_counter(args).await,
        Command::Produce(args) => {
            let cfg = config_or_exit("mqc-kit", &cli.config);
            mqc_testkit::app::produce(cfg, args).await
        }
    };
    exit_on("mqc-kit", done);
}
