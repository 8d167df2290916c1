//! Command-line definitions (clap derive), and the way out that every binary of the project
//! shares: exit codes, bad usage, a bad config, a failure at run time.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::arbiter::config::Percent;

/// Exit code for bad usage (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;
/// Exit code for a bad configuration (sysexits EX_CONFIG).
pub const EXIT_CONFIG: i32 = 78;
/// Exit code for a failure at run time (Redis unreachable, an id unknown, …).
pub const EXIT_RUNTIME: i32 = 1;

/// The command line as `T`: `--help` and `--version` print and exit 0; bad usage prints clap's
/// message and exits [`EXIT_USAGE`].
pub fn parse_or_exit<T: Parser>() -> T {
    match T::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            std::process::exit(EXIT_USAGE);
        }
    }
}

/// The config at `path`, loaded and validated; else the problem (naming the key) on one line as
/// `program`, and exit [`EXIT_CONFIG`].
pub fn config_or_exit(program: &str, path: &Path) -> crate::config::Validated {
    match crate::config::Config::load(path).and_then(crate::config::Config::validate) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::exit(EXIT_CONFIG);
        }
    }
}

/// If `r` failed: its error chain on one line as `program`, and exit [`EXIT_RUNTIME`].
pub fn exit_on(program: &str, r: anyhow::Result<()>) {
    if let Err(e) = r {
        eprintln!("{program}: {e:#}");
        std::process::exit(EXIT_RUNTIME);
    }
}

/// Moves a consumer between Apache Kafka and Apache RocketMQ with no loss and no double
/// processing, arbitrating every message through Redis.
#[derive(Debug, Parser)]
#[command(name = "mq-cutover", version)]
pub struct Cli {
    /// The TOML config file; `MQ_CUTOVER__SECTION__KEY` variables override its keys.
    #[arg(
        long,
        short,
        global = true,
        env = "MQ_CUTOVER_CONFIG",
        default_value = "config/mq-cutover.toml"
    )]
    pub config: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon until SIGTERM / SIGINT.
    Run,
    /// Validate the config and print a summary; exit 78 naming the key on a problem.
    CheckConfig,
    /// Show or change the switches shared by every instance.
    #[command(subcommand)]
    Switch(SwitchCommand),
    /// Show what Redis holds about one message id, in words.
    Inspect {
        /// The cross-broker message id.
        message_id: String,
    },
    /// Hand a dead or in-doubt id back to pending (attempts reset, owner kept); audited.
    Release {
        /// The cross-broker message id.
        message_id: String,
    },
    /// Show the newest entries of the audit trail (switch changes, releases, replays).
    Audit {
        /// How many entries.
        #[arg(long, default_value_t = 20)]
        count: usize,
    },
    /// Read or replay the dead letters.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// The dual-read check: per-side counts per minute / day and the ids seen by one side only
    /// for longer than `parity.grace`. Exits 0 either way; `--fail-on-gap` exits 2 on a gap.
    Parity {
        /// How far back to look, e.g. `30m`, `6h`, `7d`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
        /// Most one-sided ids listed per side.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print the report as JSON (the same document as `GET /api/parity`).
        #[arg(long)]
        json: bool,
        /// Exit 2 when some id was seen by one side only (for scripts gating a cut-over step).
        #[arg(long)]
        fail_on_gap: bool,
    },
}

/// `dead …`.
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// The newest dead letters, one line each.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        count: usize,
    },
    /// One dead letter in full (payload included).
    Show {
        /// Its entry id, as `dead list` prints it.
        entry: String,
    },
    /// Send dead letters through the claim / sink path again (audited).
    Replay {
        /// The entry id to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        entry: Option<String>,
        /// Replay every dead letter that has a message id.
        #[arg(long)]
        all: bool,
    },
}

/// `switch …`.
#[derive(Debug, Subcommand)]
pub enum SwitchCommand {
    /// Print the switches and the latest changes.
    Show,
    /// Change the consume switch and/or the percentage.
    Set(SetArgs),
    /// Edit or list the whitelist of business ids forced to the new side.
    #[command(subcommand)]
    Whitelist(WhitelistCommand),
}

/// `switch set`.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("change").required(true).multiple(true))]
pub struct SetArgs {
    /// Consume switch: off routes everything to the old side.
    #[arg(long, group = "change")]
    pub consume: Option<OnOff>,
    /// Percentage of business-id buckets routed to the new side, 0-100.
    #[arg(long, group = "change", value_parser = parse_percent)]
    pub percent: Option<Percent>,
}

/// `on` / `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// `switch whitelist …`.
#[derive(Debug, Subcommand)]
pub enum WhitelistCommand {
    /// Add business ids.
    Add {
        /// Business ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove business ids.
    Remove {
        /// Business ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// List the whitelist.
    List,
}

fn parse_percent(s: &str) -> Result<Percent, String> {
    s.parse()
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
    fn percent_out_of_range_is_a_usage_error() {
        let e =
            Cli::try_parse_from(["mq-cutover", "switch", "set", "--percent", "101"]).unwrap_err();
        assert!(e.to_string().contains("between 0 and 100"), "{e}");
    }

    #[test]
    fn switch_set_needs_a_change() {
        assert!(Cli::try_parse_from(["mq-cutover", "switch", "set"]).is_err());
    }

    #[test]
    fn switch_set_parses_both() {
        let cli = Cli::try_parse_from([
            "mq-cutover",
            "switch",
            "set",
            "--consume",
            "on",
            "--percent",
            "10",
        ])
        .unwrap();
        match cli.command {
            Command::Switch(SwitchCommand::Set(a)) => {
                assert_eq!(a.consume, Some(OnOff::On));
                assert_eq!(a.percent.unwrap().get(), 10);
            }
            other => panic!("{other:?}"),
        }
    }
}
