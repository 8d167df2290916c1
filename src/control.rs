//! Operator actions on a running deployment: read and change the switches, inspect and release
//! one id, read the audit trail, read and replay the dead letters. The CLI and the admin API both
//! call these, so validation and the audit trail are the same whichever an operator uses.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::arbiter::switches::{AuditEntry, SwitchChange, SwitchStore, Switches};
use crate::arbiter::{Arbiter, Record};
use crate::config::Validated;
use crate::dead::DeadLetter;
use crate::pipeline::{Replayed, Shared};
use crate::store::{Store, StoreError};

/// Why an operator action failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Redis is unreachable or refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Redis holds nothing for this id (never seen, or its retention ran out).
    #[error("no record of message id `{0}` (never seen, or expired)")]
    UnknownId(String),
    /// Only dead (including in-doubt) ids can be released.
    #[error("message id `{id}` is {state}, not dead; only dead or in-doubt ids can be released")]
    NotDead {
        /// The id.
        id: String,
        /// Its state.
        state: String,
    },
    /// No dead letter has this entry id (never parked, replayed already, or trimmed).
    #[error("no dead letter `{0}` (replayed already, or trimmed from the stream)")]
    UnknownDeadLetter(String),
    /// This handle was built without a pipeline to replay through.
    #[error("replay is not available here: no sink is configured for this handle")]
    NoReplay,
}

/// What replaying one dead letter came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Delivered now, or found delivered already; the letter is removed.
    Delivered,
    /// Called and parked again, with this reason; the old letter is removed (a new one was
    /// written).
    ParkedAgain(String),
    /// Not replayed, for this reason (no message id, or the id is in flight elsewhere); the
    /// letter stays.
    Skipped(String),
}

impl ReplayOutcome {
    /// `delivered`, `parked_again` or `skipped`, for the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            ReplayOutcome::Delivered => "delivered",
            ReplayOutcome::ParkedAgain(_) => "parked_again",
            ReplayOutcome::Skipped(_) => "skipped",
        }
    }
}

impl std::fmt::Display for ReplayOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplayOutcome::Delivered => f.write_str("delivered"),
            ReplayOutcome::ParkedAgain(reason) => write!(f, "parked again: {reason}"),
            ReplayOutcome::Skipped(why) => write!(f, "not replayed: {why}"),
        }
    }
}

/// The pipeline a replay goes through: the claim / sink path of the daemon (or of the CLI).
struct Replay {
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

/// The operator's handle on one deployment.
pub struct Control {
    switches: SwitchStore,
    arbiter: Arbiter,
    dead: crate::dead::DeadLetters,
    parity: crate::parity::Parity,
    replay: Option<Replay>,
}

impl Control {
    /// Connects now (fails fast when Redis is away).
    pub async fn connect(cfg: &Validated) -> Result<Control, ControlError> {
        let store = Store::connect(&cfg.redis, false).await?;
        Ok(Control::new(&store, cfg))
    }

    /// On an existing connection (the daemon's).
    pub fn new(store: &Store, cfg: &Validated) -> Control {
        Control {
            switches: SwitchStore::new(store),
            arbiter: Arbiter::new(store, &cfg.arbiter),
            dead: crate::dead::DeadLetters::new(store, cfg.dead_letters.max_len),
            parity: crate::parity::Parity::new(store, cfg),
            replay: None,
        }
    }

    /// Lets this handle replay dead letters through `shared` (the daemon's pipeline, so replays
    /// share its sink, circuit breaker, completer and metrics); `cancel` interrupts a replay in
    /// progress at shutdown (its lease is handed back, the letter stays).
    pub fn with_replay(mut self, shared: Arc<Shared>, cancel: CancellationToken) -> Control {
        self.replay = Some(Replay { shared, cancel });
        self
    }

    /// The parity report for the last `span`, listing at most `limit` one-sided ids per side.
    pub async fn parity(
        &self,
        span: std::time::Duration,
        limit: usize,
    ) -> Result<crate::parity::ParityReport, ControlError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let since = now.saturating_sub(span).as_millis() as u64;
        Ok(self.parity.report(since, limit).await?)
    }

    /// The newest dead letters, newest first.
    pub async fn dead_letters(
        &self,
        count: usize,
    ) -> Result<Vec<crate::dead::DeadLetter>, ControlError> {
        Ok(self.dead.list(count).await?)
    }

    /// How many dead letters the stream holds.
    pub async fn dead_letter_count(&self) -> Result<u64, ControlError> {
        Ok(self.dead.count().await?)
    }

    /// One dead letter by its entry id.
    pub async fn dead_letter(&self, entry: &str) -> Result<DeadLetter, ControlError> {
        self.dead
            .get(entry)
            .await?
            .ok_or_else(|| ControlError::UnknownDeadLetter(entry.to_owned()))
    }

    /// Every dead letter, oldest first (for replaying them all).
    pub async fn all_dead_letters(&self) -> Result<Vec<DeadLetter>, ControlError> {
        Ok(self.dead.all().await?)
    }

    /// Replays the dead letter with this entry id; see [`Control::replay`].
    pub async fn replay_entry(&self, entry: &str, by: &str) -> Result<ReplayOutcome, ControlError> {
        let letter = self.dead_letter(entry).await?;
        self.replay(&letter, by).await
    }

    /// Sends one dead letter through the claim / sink path again, as its owner: the id is
    /// released (dead → pending), claimed, called and recorded exactly like a copy from a broker.
    /// A letter that was delivered or parked again is removed; every replay of a letter with a
    /// message id is audited, whatever it came to.
    pub async fn replay(
        &self,
        letter: &DeadLetter,
        by: &str,
    ) -> Result<ReplayOutcome, ControlError> {
        let replay = self.replay.as_ref().ok_or(ControlError::NoReplay)?;
        let Some(id) = letter.message_id.as_deref() else {
            return Ok(ReplayOutcome::Skipped(format!(
                "no message id ({})",
                letter.reason
            )));
        };
        let outcome = match crate::pipeline::replay(&replay.shared, letter, &replay.cancel).await? {
            Replayed::Done => ReplayOutcome::Delivered,
            Replayed::DeadAgain(reason) => ReplayOutcome::ParkedAgain(reason),
            Replayed::Elsewhere(why) => ReplayOutcome::Skipped(why),
        };
        if !matches!(outcome, ReplayOutcome::Skipped(_)) {
            self.dead.remove(&letter.entry).await?;
        }
        self.switches
            .audit(by, "replay", &format!("{id} ({}): {outcome}", letter.entry))
            .await?;
        Ok(outcome)
    }

    /// The switches now.
    pub async fn switches(&self) -> Result<Switches, ControlError> {
        Ok(self.switches.get().await?)
    }

    /// Applies a change; `Some(version)` if anything changed.
    pub async fn set_switches(
        &self,
        change: &SwitchChange,
        by: &str,
    ) -> Result<Option<u64>, ControlError> {
        Ok(self.switches.set(change, by).await?)
    }

    /// The newest audit entries, newest first.
    pub async fn audit(&self, count: usize) -> Result<Vec<AuditEntry>, ControlError> {
        Ok(self.switches.audit_log(count).await?)
    }

    /// What Redis holds about `id`.
    pub async fn inspect(&self, id: &str) -> Result<Record, ControlError> {
        self.arbiter
            .inspect(id)
            .await?
            .ok_or_else(|| ControlError::UnknownId(id.to_owned()))
    }

    /// Releases a dead id back to pending and records who did it. Returns the reason it had
    /// been parked for.
    pub async fn release(&self, id: &str, by: &str) -> Result<String, ControlError> {
        match self.arbiter.release(id).await? {
            Some(reason) => {
                self.switches
                    .audit(by, "release", &format!("{id}: dead ({reason}) -> pending"))
                    .await?;
                Ok(reason)
            }
            None => {
                let state = self.inspect(id).await?.state.to_string();
                Err(ControlError::NotDead {
                    id: id.to_owned(),
                    state,
                })
            }
        }
    }
}
