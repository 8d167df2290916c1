//! Operator actions on a running deployment: read and change the switches, inspect and release
//! one id, read the audit trail. The CLI uses these today; the admin API will call the same ones.

use crate::arbiter::switches::{AuditEntry, SwitchChange, SwitchStore, Switches};
use crate::arbiter::{Arbiter, Record};
use crate::config::Validated;
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
}

/// The operator's handle on one deployment.
pub struct Control {
    switches: SwitchStore,
    arbiter: Arbiter,
    dead: crate::dead::DeadLetters,
    parity: crate::parity::Parity,
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
        }
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
