//! `mqc-kit` command-line definitions (clap derive) and nothing else.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The test and demo tools of mq-cutover: a fake reward service, the benchmark's grant counter
/// and a dual-write traffic generator. Not part of the daemon's image.
#[derive(Debug, Parser)]
#[command(name = "mqc-kit", version)]
pub struct Cli {
    /// The daemon's TOML config file, read by `produce` for the sides and their brokers;
    /// `MQ_CUTOVER__SECTION__KEY` variables override its keys.
    #[arg(
        long,
        short,
        global = true,
        env = "MQ_CUTOVER_CONFIG",
        default_value = "config/mq-cutover.toml"
    )]
    pub config: PathBuf,

    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Dual-write test traffic to both brokers, the way a migrating producer does.
    Produce(crate::produce::ProduceArgs),
    /// Run the demo reward service: a real HTTP endpoint that records every call and injects
    /// faults (no config file needed).
    RewardService(crate::reward::RewardArgs),
    /// Run the benchmark's downstream: answers 200 at once and only counts grants per id and
    /// end-to-end times (no config file needed).
    GrantCounter(crate::grant_counter::GrantCounterArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_is_accepted_after_the_subcommand() {
        let cli = Cli::try_parse_from(["mqc-kit", "produce", "--config", "x.toml", "--count", "3"])
            .unwrap();
        assert_eq!(cli.config, PathBuf::from("x.toml"));
        match cli.command {
            Command::Produce(a) => assert_eq!(a.count, 3),
            other => panic!("{other:?}"),
        }
    }
}
