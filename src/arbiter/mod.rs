//! The arbiter: one small Redis record per message id, changed only by atomic Lua scripts, that
//! decides which side owns the id, hands out at most one live lease on it, and records its fate.
//!
//! `claim` → [`Claim`] (PROCEED, NOT_MINE, DONE, BUSY, DEAD); `complete` records an [`Outcome`]
//! under the lease token; `renew` keeps a lease alive while a call is in flight. Each has a
//! batched form that sends many ids in one round trip: on standalone Redis a batch of claims or
//! completions is one script call, renewals are one pipeline; on Cluster every id is its own call.
//! The keys, the states and the memory per id are described in `docs/arbiter.md`.

pub mod config;
pub mod model;
pub mod routing;
pub mod switches;
pub mod waiting;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{Cmd, Pipeline, RedisResult, Value};

use self::config::{AmbiguousPolicy, ArbiterConfig, RecordLayout};
use crate::store::{Conn, Store, StoreError};

/// A Lua script, sent by SHA1 and re-sent whole when Redis answers NOSCRIPT (after a restart or
/// a failover to a node that never saw it).
struct LuaScript {
    code: &'static str,
    sha: String,
}

impl LuaScript {
    fn new(code: &'static str) -> Self {
        Self {
            code,
            sha: redis::Script::new(code).get_hash().to_owned(),
        }
    }

    /// `EVALSHA sha 1 key` (or `EVAL code 1 key`), ready for the script's arguments.
    fn cmd(&self, key: &str, whole: bool) -> Cmd {
        let mut c = self.head(1, whole);
        c.arg(key);
        c
    }

    /// `EVALSHA sha <keys>` (or `EVAL code <keys>`), ready for the keys and then the arguments.
    fn head(&self, keys: usize, whole: bool) -> Cmd {
        let mut c = if whole {
            let mut c = redis::cmd("EVAL");
            c.arg(self.code);
            c
        } else {
            let mut c = redis::cmd("EVALSHA");
            c.arg(&self.sha);
            c
        };
        c.arg(keys);
        c
    }
}

struct Scripts {
    claim: LuaScript,
    complete: LuaScript,
    adopt: LuaScript,
    renew: LuaScript,
    release: LuaScript,
    read: LuaScript,
    letter: LuaScript,
}

/// A script that reads or writes records: `record.lua` (the layouts) in front of its own code.
macro_rules! record_script {
    ($file:literal) => {
        LuaScript::new(concat!(
            include_str!("scripts/record.lua"),
            include_str!(concat!("scripts/", $file))
        ))
    };
}

/// A many-id script: `record.lua`, then `batch.lua` (the batch's answers), then its own code.
macro_rules! batch_script {
    ($file:literal) => {
        LuaScript::new(concat!(
            include_str!("scripts/record.lua"),
            include_str!("scripts/batch.lua"),
            include_str!(concat!("scripts/", $file))
        ))
    };
}

/// A many-id script that hands out leases: `batch_script!` with `owner.lua` (the owner's claim)
/// before its own code.
macro_rules! owner_script {
    ($file:literal) => {
        LuaScript::new(concat!(
            include_str!("scripts/record.lua"),
            include_str!("scripts/batch.lua"),
            include_str!("scripts/owner.lua"),
            include_str!(concat!("scripts/", $file))
        ))
    };
}

impl Scripts {
    fn load() -> Self {
        Self {
            claim: owner_script!("claim.lua"),
            complete: batch_script!("complete.lua"),
            adopt: owner_script!("adopt.lua"),
            renew: record_script!("renew.lua"),
            release: record_script!("release.lua"),
            read: record_script!("read.lua"),
            letter: record_script!("letter.lua"),
        }
    }
}

/// The fencing token of one claim attempt: unique per process and attempt.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseToken(String);

impl LeaseToken {
    /// The token as stored in Redis.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Hands out lease tokens: a random per-process prefix and a counter, so two processes (or a
/// restarted one) never share a token.
#[derive(Debug)]
pub struct LeaseTokens {
    prefix: String,
    next: AtomicU64,
}

impl Default for LeaseTokens {
    fn default() -> Self {
        Self {
            prefix: format!("{:08x}", rand::random::<u32>()),
            next: AtomicU64::new(1),
        }
    }
}

impl LeaseTokens {
    /// A fresh token.
    pub fn next(&self) -> LeaseToken {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        LeaseToken(format!("{}.{n:x}", self.prefix))
    }
}

/// The state of an id, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Owned, not being called now: the owner may claim it.
    Pending,
    /// A worker of the owner holds a lease and is calling the sink.
    InFlight,
    /// Delivered.
    Done,
    /// Parked in dead letters (fatal, exhausted, or in doubt).
    Dead,
}

impl State {
    fn from_code(code: &str) -> Option<State> {
        match code {
            "p" => Some(State::Pending),
            "i" => Some(State::InFlight),
            "d" => Some(State::Done),
            "x" => Some(State::Dead),
            _ => None,
        }
    }

    /// The state in words.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::InFlight => "in-flight",
            State::Done => "done",
            State::Dead => "dead",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One claim: this side offers a copy of `id` and says whom its switches route it to.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    /// The cross-broker message id.
    pub id: &'a str,
    /// The side that holds this copy.
    pub side: &'a str,
    /// The side this side's current switches route the id to (used only if nobody decided yet).
    pub routed_owner: &'a str,
    /// The token the lease will carry if granted.
    pub token: &'a LeaseToken,
}

/// The answer to a claim (DESIGN.md, "Arbitration protocol").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This side owns the id and now holds its lease: call the sink.
    Proceed {
        /// Which call this is for the id, 1-based, across all workers of the owner.
        attempt: u32,
        /// An earlier worker's lease expired with its outcome unknown (counted as ambiguous).
        takeover: bool,
    },
    /// The other side owns the id: acknowledge this copy and do nothing else — but if the owner
    /// has not observed the id yet, keep the copy's position first, so that this side can adopt
    /// the id should the owner's copy never come (DESIGN.md invariant 2).
    NotMine {
        /// The owning side.
        owner: String,
        /// Whether the owner has observed the id (its copy will decide).
        owner_seen: bool,
    },
    /// Already delivered: acknowledge the duplicate.
    Done,
    /// Another worker of the owner holds a live lease: try again later, do not acknowledge.
    Busy {
        /// Time until that lease runs out if not renewed.
        retry_in: Duration,
    },
    /// Parked in dead letters: acknowledge, once its letter is written.
    Dead {
        /// Why it was parked.
        reason: String,
        /// Whether the letter of this dead state is written; if not, the caller writes it (with
        /// this copy) and notes it with [`Arbiter::letter_written`] before acknowledging.
        letter: bool,
    },
}

/// One adoption attempt: `side` observed `id`, whose owner never did, and asks to take it over.
#[derive(Debug, Clone, Copy)]
pub struct AdoptRequest<'a> {
    /// The cross-broker message id.
    pub id: &'a str,
    /// The side that observed it and would adopt it.
    pub side: &'a str,
    /// The token the lease will carry if granted.
    pub token: &'a LeaseToken,
}

/// The answer to an adoption attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adopt {
    /// This side owns the id (adopted now, or before) and holds its lease: read the copy again
    /// and call the sink.
    Proceed {
        /// Which call this is for the id, 1-based.
        attempt: u32,
        /// An earlier worker's lease expired with its outcome unknown (counted as ambiguous).
        takeover: bool,
        /// This very call adopted the id (the owner changed to this side now).
        adopted: bool,
    },
    /// The owner has observed the id: its copy decides; nothing to adopt.
    OwnerSeen,
    /// Already delivered.
    Done,
    /// Parked; see [`Claim::Dead`].
    Dead {
        /// Why it was parked.
        reason: String,
        /// Whether its letter is written.
        letter: bool,
    },
    /// A live lease is held: try again later.
    Busy {
        /// Time until that lease runs out if not renewed.
        retry_in: Duration,
    },
    /// The owner still has time to observe it.
    NotYet {
        /// Time until the id may be adopted.
        wait: Duration,
    },
    /// No record any more (it outlived the retention): nothing can be arbitrated.
    Gone,
}

/// What a claim learned about who has observed the id, for parity ([`crate::parity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sighting {
    /// This side had observed the id before (a redelivered copy): nothing new for parity.
    Again,
    /// This side is the first to observe the id: it is one-sided until the other side sees it.
    First,
    /// This side is new to the id and another side had observed it: the pair is complete.
    Pair,
}

/// What came of a sink call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered.
    Success,
    /// Failed in a way a later call may fix (5xx, 429, connection refused).
    Retryable(String),
    /// Failed in a way no retry will fix (4xx other than 408 / 429).
    Fatal(String),
    /// Unknown: the request was sent and no answer came (timeout, cut connection).
    Ambiguous(String),
    /// No call was made (shutting down while waiting): the lease is handed back unused and the
    /// attempt does not count.
    NotCalled,
}

impl Outcome {
    fn code(&self) -> (&'static str, &str) {
        match self {
            Outcome::Success => ("s", ""),
            Outcome::Retryable(r) => ("r", r),
            Outcome::Fatal(r) => ("f", r),
            Outcome::Ambiguous(r) => ("a", r),
            Outcome::NotCalled => ("n", ""),
        }
    }
}

/// One completion: the outcome of the call made under `token`.
#[derive(Debug, Clone, Copy)]
pub struct CompleteRequest<'a> {
    /// The cross-broker message id.
    pub id: &'a str,
    /// The side that made the call.
    pub side: &'a str,
    /// The lease token the call was made under.
    pub token: &'a LeaseToken,
    /// What happened.
    pub outcome: &'a Outcome,
}

/// What `complete` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The lease was ours; the id is now in this state (pending means: the owner retries).
    Recorded(State),
    /// The lease had been lost, but the call succeeded: recorded as done and counted as an
    /// overlap (another call may have been made for the same id).
    Late,
    /// The lease had been lost and the call failed: nothing changed; the current holder decides.
    Fenced,
    /// This token's outcome had been recorded already (a resent batch): nothing changed.
    Repeated(State),
}

/// Everything stored about one id, for `inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The id.
    pub id: String,
    /// The owning side.
    pub owner: String,
    /// The state.
    pub state: State,
    /// Calls made so far.
    pub attempts: u32,
    /// The lease token and the time left on it, while in flight.
    pub lease: Option<(String, Duration)>,
    /// The sides that have observed a copy.
    pub seen: Vec<String>,
    /// The owner was changed by adoption: the side routed to own it never observed it.
    pub adopted: bool,
    /// Dead, and its dead letter is written.
    pub letter: bool,
    /// Calls whose outcome was ambiguous (timeouts, expired leases).
    pub ambiguous: u32,
    /// Successes recorded after their lease was lost.
    pub overlaps: u32,
    /// Why it is dead, if it is.
    pub reason: Option<String>,
    /// When the first copy was observed, ms since the Unix epoch (Redis clock).
    pub first_seen_ms: u64,
    /// Time until the record expires.
    pub expires_in: Option<Duration>,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "message {}", self.id)?;
        writeln!(f, "  owner:     {}", self.owner)?;
        writeln!(f, "  state:     {}", self.state)?;
        writeln!(f, "  attempts:  {}", self.attempts)?;
        match &self.lease {
            Some((token, left)) if !left.is_zero() => writeln!(
                f,
                "  lease:     held by {token}, {} left",
                humantime::format_duration(Duration::from_millis(left.as_millis() as u64))
            )?,
            Some((token, _)) => writeln!(f, "  lease:     held by {token}, expired")?,
            None => writeln!(f, "  lease:     none")?,
        }
        writeln!(f, "  seen by:   {}", self.seen.join(", "))?;
        if self.adopted {
            writeln!(
                f,
                "  adopted:   by {}, the routed owner never observed it",
                self.owner
            )?;
        }
        if self.state == State::Dead && !self.letter {
            writeln!(
                f,
                "  letter:    not written yet (the next copy or sweep writes it)"
            )?;
        }
        if self.ambiguous > 0 {
            writeln!(
                f,
                "  ambiguous: {} call(s) with unknown outcome",
                self.ambiguous
            )?;
        }
        if self.overlaps > 0 {
            writeln!(
                f,
                "  overlaps:  {} success(es) after a lost lease",
                self.overlaps
            )?;
        }
        if let Some(r) = &self.reason {
            writeln!(f, "  reason:    {r}")?;
        }
        if let Some(t) = self.expires_in {
            writeln!(
                f,
                "  expires:   in {}",
                humantime::format_duration(Duration::from_secs(t.as_secs()))
            )?;
        }
        Ok(())
    }
}

/// The arbiter: claim, complete, renew, inspect, release; see the module docs.
#[derive(Clone)]
pub struct Arbiter {
    conn: Conn,
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
    lease_ms: u64,
    /// The TTL every script sets on a record: the retention plus [`EXPIRY_SLACK`].
    ttl_ms: u64,
    policy: &'static str,
    max_attempts: u32,
    /// The layout of a new record: `p` packed, `h` hash.
    layout: &'static str,
    /// How long the owner has to observe an id before an observer may adopt it, ms.
    adopt_after_ms: u64,
    /// `arbiter.replicas`: replicas that must confirm each claim, adoption and completion.
    replicas: u32,
    /// `arbiter.replica_timeout`, ms: how long `WAIT` waits for them.
    replica_timeout_ms: u64,
}

/// A record lives `arbiter.retention` plus this after the claim that last set its TTL. A claim
/// within this of the id's first claim (the other side's copy, nearly always) leaves the TTL
/// as it is, so that a record still outlives its last claim by the whole retention.
pub const EXPIRY_SLACK: Duration = Duration::from_secs(60);

/// A record as [`Arbiter::read`] returns it: its fields under the hash layout's names, its PTTL
/// (ms) and the server's time (ms).
type RawRecord = (Vec<(String, String)>, i64, u64);

/// The key of an id's record: `<prefix>:m:{<id>}` (the braces keep it in one cluster slot).
pub fn record_key(prefix: &str, id: &str) -> String {
    let mut key = String::with_capacity(prefix.len() + id.len() + 5);
    write_record_key(&mut key, prefix, id);
    key
}

/// [`record_key`] appended to `out`.
fn write_record_key(out: &mut String, prefix: &str, id: &str) {
    out.push_str(prefix);
    out.push_str(":m:{");
    out.push_str(id);
    out.push('}');
}

impl Arbiter {
    /// An arbiter over `store` with the protocol settings of `cfg`.
    pub fn new(store: &Store, cfg: &ArbiterConfig) -> Self {
        Self {
            conn: store.conn(),
            prefix: store.prefix().into(),
            scripts: Arc::new(Scripts::load()),
            lease_ms: cfg.lease.as_millis() as u64,
            ttl_ms: (cfg.retention + EXPIRY_SLACK).as_millis() as u64,
            policy: match cfg.ambiguous {
                AmbiguousPolicy::AtLeastOnce => "l",
                AmbiguousPolicy::AtMostOnce => "m",
            },
            max_attempts: cfg.max_attempts.get(),
            layout: match cfg.record_layout {
                RecordLayout::Packed => "p",
                RecordLayout::Hash => "h",
            },
            adopt_after_ms: cfg.adopt_after.as_millis() as u64,
            replicas: cfg.replicas,
            replica_timeout_ms: cfg.replica_timeout.as_millis() as u64,
        }
    }

    /// How long the owner has to observe an id before an observer may adopt it.
    pub fn adopt_after(&self) -> Duration {
        Duration::from_millis(self.adopt_after_ms)
    }

    /// The connection and key prefix this arbiter uses (for the adoption index, which lives
    /// beside the records).
    pub(crate) fn conn(&self) -> (Conn, &str) {
        (self.conn.clone(), &self.prefix)
    }

    /// Tries to adopt many ids in one round trip (`adopt.lua`); see [`Adopt`].
    pub async fn adopt_batch(
        &self,
        reqs: &[AdoptRequest<'_>],
    ) -> Result<Vec<Result<Adopt, StoreError>>, StoreError> {
        self.run_many(&self.scripts.adopt, reqs, Arbiter::adopt_args, parse_adopt)
            .await
    }

    /// Notes that the dead letter of `id`'s current dead state is written (after parking it),
    /// so that later claims answer DEAD without asking for it again. False if `id` is not dead.
    pub async fn letter_written(&self, id: &str) -> Result<bool, StoreError> {
        let key = record_key(&self.prefix, id);
        let n: i64 = self
            .eval(|whole| self.scripts.letter.cmd(&key, whole))
            .await?;
        Ok(n == 1)
    }

    /// The lease length.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// Claims one id. See [`Claim`].
    pub async fn claim(&self, req: &ClaimRequest<'_>) -> Result<Claim, StoreError> {
        single(self.claim_batch(std::slice::from_ref(req)).await)
    }

    /// Claims many ids in one round trip; the answers come back in order.
    pub async fn claim_batch(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<Result<Claim, StoreError>>, StoreError> {
        Ok(self
            .claim_batch_sighted(reqs)
            .await?
            .into_iter()
            .map(|r| r.map(|(claim, _)| claim))
            .collect())
    }

    /// [`Arbiter::claim_batch`], also telling for each id whether this side's copy is its first
    /// sight of it and whether another side had seen it (what parity records).
    pub async fn claim_batch_sighted(
        &self,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<Result<(Claim, Sighting), StoreError>>, StoreError> {
        self.run_many(&self.scripts.claim, reqs, Arbiter::claim_args, parse_claim)
            .await
    }

    /// Records the outcome of one call.
    pub async fn complete(&self, req: &CompleteRequest<'_>) -> Result<Completion, StoreError> {
        single(self.complete_batch(std::slice::from_ref(req)).await)
    }

    /// Records many outcomes in one round trip; the answers come back in order.
    pub async fn complete_batch(
        &self,
        reqs: &[CompleteRequest<'_>],
    ) -> Result<Vec<Result<Completion, StoreError>>, StoreError> {
        self.run_many(
            &self.scripts.complete,
            reqs,
            Arbiter::complete_args,
            parse_completion,
        )
        .await
    }

    /// Extends the lease on `id` if `token` still holds it; false means the lease is lost.
    pub async fn renew(&self, id: &str, token: &LeaseToken) -> Result<bool, StoreError> {
        single(self.renew_batch(&[(id, token)]).await)
    }

    /// Renews many leases in one round trip.
    pub async fn renew_batch(
        &self,
        leases: &[(&str, &LeaseToken)],
    ) -> Result<Vec<Result<bool, StoreError>>, StoreError> {
        let replies = self.exec(leases).await?;
        Ok(replies
            .into_iter()
            .map(|r| {
                r.and_then(|v| match v {
                    Value::Int(n) => Ok(n == 1),
                    other => Err(StoreError::Reply(format!("renew: {other:?}"))),
                })
            })
            .collect())
    }

    /// Everything stored about `id`, or `None` if Redis knows nothing of it.
    pub async fn inspect(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let (fields, pttl, now_ms) = self.read(id).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        Ok(Some(parse_record(id, fields, pttl, now_ms)?))
    }

    /// The stored fields of `id`'s record under the hash layout's names (`o`, `s`, `t`, `e`, `a`,
    /// `f`, `m`, `v`, `r`, and `@side` per observing side) whichever layout holds them, empty when
    /// there is no record; then its PTTL (ms, negative as `PTTL` answers) and the server's time (ms).
    async fn read(&self, id: &str) -> Result<RawRecord, StoreError> {
        let key = record_key(&self.prefix, id);
        Ok(self
            .eval(|whole| self.scripts.read.cmd(&key, whole))
            .await?)
    }

    /// Hands a dead (or in-doubt) id back to pending with its attempts reset, keeping its owner.
    /// Returns the reason it had been parked for, or `None` if it was not dead.
    pub async fn release(&self, id: &str) -> Result<Option<String>, StoreError> {
        let key = record_key(&self.prefix, id);
        let (released, reason): (i64, String) = self
            .eval(|whole| {
                let mut c = self.scripts.release.cmd(&key, whole);
                c.arg(self.ttl_ms);
                c
            })
            .await?;
        Ok((released == 1).then_some(reason))
    }

    /// The record keys of `ids`, as a script's keys.
    fn key_args<'a>(&self, ids: impl Iterator<Item = &'a str>, c: &mut Cmd) {
        let mut key = String::new();
        for id in ids {
            key.clear();
            write_record_key(&mut key, &self.prefix, id);
            c.arg(key.as_str());
        }
    }

    /// The keys and arguments of `claim.lua` for `reqs`.
    fn claim_args(&self, reqs: &[ClaimRequest<'_>], c: &mut Cmd) {
        self.key_args(reqs.iter().map(|r| r.id), c);
        c.arg(self.lease_ms)
            .arg(self.ttl_ms)
            .arg(self.policy)
            .arg(self.layout)
            .arg(EXPIRY_SLACK.as_millis() as u64);
        for r in reqs {
            c.arg(r.side).arg(r.routed_owner).arg(r.token.as_str());
        }
    }

    /// The keys and arguments of `adopt.lua` for `reqs`.
    fn adopt_args(&self, reqs: &[AdoptRequest<'_>], c: &mut Cmd) {
        self.key_args(reqs.iter().map(|r| r.id), c);
        c.arg(self.lease_ms)
            .arg(self.ttl_ms)
            .arg(self.policy)
            .arg(self.layout)
            .arg(self.adopt_after_ms);
        for r in reqs {
            c.arg(r.side).arg(r.token.as_str());
        }
    }

    /// The keys and arguments of `complete.lua` for `reqs`.
    fn complete_args(&self, reqs: &[CompleteRequest<'_>], c: &mut Cmd) {
        self.key_args(reqs.iter().map(|r| r.id), c);
        c.arg(self.policy)
            .arg(self.max_attempts)
            .arg(self.ttl_ms)
            .arg(self.layout);
        for r in reqs {
            let (code, reason) = r.outcome.code();
            c.arg(r.token.as_str()).arg(code).arg(r.side).arg(reason);
        }
    }

    /// Runs a many-id script (`claim.lua`, `complete.lua`) over `items` and returns one answer per
    /// item, in order. A failure of the whole round trip comes back as the outer error.
    ///
    /// Standalone: one script call for the whole batch — one round trip, one script invocation,
    /// one clock read. Cluster: a script's keys must share a slot and every id has its own, so
    /// each id is its own call, sent concurrently (the multiplexed connection to each node writes
    /// them back to back). Either way NOSCRIPT is answered by re-sending the script whole.
    async fn run_many<T: Sync, U>(
        &self,
        script: &LuaScript,
        items: &[T],
        args: fn(&Arbiter, &[T], &mut Cmd),
        answer: fn(Entry<'_>) -> Result<U, StoreError>,
    ) -> Result<Vec<Result<U, StoreError>>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        if let Conn::Cluster(_) = &self.conn {
            let each = futures::future::join_all(
                items
                    .chunks(1)
                    .map(|one| self.run_script(script, one, args, answer)),
            )
            .await;
            return Ok(each
                .into_iter()
                .map(|r| r.and_then(|mut one| one.pop().expect("one answer per call")))
                .collect());
        }
        match self.run_script(script, items, args, answer).await {
            Ok(answers) => Ok(answers),
            // Redis away: nothing was decided, the caller tries the whole batch again.
            Err(e) if e.is_retryable() => Err(e),
            // Redis refused the script (out of memory, a foreign key of the wrong type) or
            // answered nonsense: every id of the batch gets that answer.
            Err(e) => {
                let text = e.to_string();
                let mut out = Vec::with_capacity(items.len());
                out.push(Err(e));
                out.extend((1..items.len()).map(|_| Err(StoreError::Reply(text.clone()))));
                Ok(out)
            }
        }
    }

    /// One call of a many-id script over `part`: its answers, in order.
    async fn run_script<T, U>(
        &self,
        script: &LuaScript,
        part: &[T],
        args: fn(&Arbiter, &[T], &mut Cmd),
        answer: fn(Entry<'_>) -> Result<U, StoreError>,
    ) -> Result<Vec<Result<U, StoreError>>, StoreError> {
        let call = |whole| {
            let mut c = script.head(part.len(), whole);
            args(self, part, &mut c);
            c
        };
        let reply: Value = if self.replicas > 0 {
            self.eval_confirmed(call).await?
        } else {
            self.eval(call).await?
        };
        match reply {
            Value::BulkString(bytes) => entries(&bytes, part.len(), answer),
            other => Err(StoreError::Reply(format!(
                "{} answers expected, got {other:?}",
                part.len()
            ))),
        }
    }

    /// `renew.lua` for one lease.
    fn command(&self, (id, token): &(&str, &LeaseToken), whole: bool) -> Cmd {
        let mut c = self.scripts.renew.cmd(&record_key(&self.prefix, id), whole);
        c.arg(token.as_str()).arg(self.lease_ms);
        c
    }

    /// Sends the renewals `ops` in one round trip and returns one answer per op, in order. A failure of the
    /// whole round trip comes back as the outer error.
    ///
    /// Standalone: one pipeline. Cluster: a pipeline must stay within one slot and every id has
    /// its own, so the ops go out as concurrent requests, which the multiplexed connection to
    /// each node writes back to back. Either way NOSCRIPT (Redis restarted, or a failover to a
    /// node that never saw the script) is answered by re-sending the script whole, which caches it.
    async fn exec(
        &self,
        ops: &[(&str, &LeaseToken)],
    ) -> Result<Vec<Result<Value, StoreError>>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        if let Conn::Cluster(_) = &self.conn {
            return Ok(futures::future::join_all(ops.iter().map(|op| self.exec_one(op))).await);
        }
        let mut conn = self.conn.clone();
        let mut pipe = Pipeline::with_capacity(ops.len());
        for op in ops {
            pipe.add_command(self.command(op, false));
        }
        let mut replies: Vec<RedisResult<Value>> =
            pipe.ignore_errors().query_async(&mut conn).await?;
        let missing: Vec<usize> = replies
            .iter()
            .enumerate()
            .filter(|(_, r)| r.as_ref().is_err_and(is_noscript))
            .map(|(i, _)| i)
            .collect();
        if !missing.is_empty() {
            let mut again = Pipeline::with_capacity(missing.len());
            for &i in &missing {
                again.add_command(self.command(&ops[i], true));
            }
            let resent: Vec<RedisResult<Value>> =
                again.ignore_errors().query_async(&mut conn).await?;
            for (i, r) in missing.into_iter().zip(resent) {
                replies[i] = r;
            }
        }
        Ok(replies
            .into_iter()
            .map(|r| r.map_err(StoreError::from))
            .collect())
    }

    async fn exec_one(&self, op: &(&str, &LeaseToken)) -> Result<Value, StoreError> {
        Ok(self.eval(|whole| self.command(op, whole)).await?)
    }

    /// Sends the script call `call(false)` (`EVALSHA`); when Redis answers NOSCRIPT, sends
    /// `call(true)` (`EVAL`, the script whole), which caches it again.
    async fn eval<R: redis::FromRedisValue>(&self, call: impl Fn(bool) -> Cmd) -> RedisResult<R> {
        let mut conn = self.conn.clone();
        match call(false).query_async(&mut conn).await {
            Err(e) if is_noscript(&e) => call(true).query_async(&mut conn).await,
            other => other,
        }
    }
}

impl Arbiter {
    /// [`Arbiter::eval`] followed, in the same pipeline (one round trip), by `WAIT replicas
    /// timeout`: the script's writes, and every earlier write on this connection, are on that
    /// many replicas before its answer is used. Fewer confirmations are
    /// [`StoreError::Unavailable`]: nothing may be started or acknowledged on a write a failover
    /// could forget; the caller tries again later, and the script's answers to a repeated call
    /// (the same lease tokens) are the same.
    async fn eval_confirmed(&self, call: impl Fn(bool) -> Cmd) -> Result<Value, StoreError> {
        let mut conn = self.conn.clone();
        let send = |whole: bool| {
            let mut p = Pipeline::with_capacity(2);
            p.add_command(call(whole));
            p.cmd("WAIT")
                .arg(self.replicas)
                .arg(self.replica_timeout_ms);
            p
        };
        let mut replies: Vec<RedisResult<Value>> =
            send(false).ignore_errors().query_async(&mut conn).await?;
        if replies
            .first()
            .is_some_and(|r| r.as_ref().is_err_and(is_noscript))
        {
            replies = send(true).ignore_errors().query_async(&mut conn).await?;
        }
        let [script, acked]: [RedisResult<Value>; 2] =
            replies.try_into().map_err(|r: Vec<_>| {
                StoreError::Reply(format!("2 replies expected, got {}", r.len()))
            })?;
        let script = script?;
        match acked? {
            Value::Int(n) if n >= i64::from(self.replicas) => Ok(script),
            Value::Int(n) => Err(StoreError::Unavailable(redis::RedisError::from((
                redis::ErrorKind::Extension,
                "write not confirmed by the replicas",
                format!(
                    "{n} of the {} replicas arbiter.replicas asks for confirmed it within {} ms",
                    self.replicas, self.replica_timeout_ms
                ),
            )))),
            other => Err(StoreError::Reply(format!("WAIT: {other:?}"))),
        }
    }
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

fn single<T>(batch: Result<Vec<Result<T, StoreError>>, StoreError>) -> Result<T, StoreError> {
    batch?
        .pop()
        .unwrap_or_else(|| Err(StoreError::Reply("empty reply to a one-op batch".into())))
}

/// One id's answer in a many-id script's reply (`batch.lua`): `<code><flag><attempts>,<n>:<extra>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry<'a> {
    code: u8,
    flag: u8,
    attempts: u32,
    extra: &'a [u8],
}

impl Entry<'_> {
    fn text(&self) -> String {
        String::from_utf8_lossy(self.extra).into_owned()
    }
}

/// Splits a many-id script's reply into its `n` answers and reads each with `answer`; an answer
/// with code `0` is that id's own error. A reply that does not split into exactly `n` answers is
/// an error for the whole batch: no answer is taken from it.
fn entries<U>(
    reply: &[u8],
    n: usize,
    answer: fn(Entry<'_>) -> Result<U, StoreError>,
) -> Result<Vec<Result<U, StoreError>>, StoreError> {
    let malformed = |at: usize| {
        StoreError::Reply(format!(
            "{n} answers expected, got a malformed reply at byte {at} of {}",
            reply.len()
        ))
    };
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    while at < reply.len() {
        let start = at;
        let (&code, &flag) = match (reply.get(at), reply.get(at + 1)) {
            (Some(c), Some(f)) => (c, f),
            _ => return Err(malformed(start)),
        };
        at += 2;
        let attempts = digits(reply, &mut at, b',').ok_or_else(|| malformed(start))?;
        let len = digits(reply, &mut at, b':').ok_or_else(|| malformed(start))? as usize;
        let end = at.checked_add(len).ok_or_else(|| malformed(start))?;
        let extra = reply.get(at..end).ok_or_else(|| malformed(start))?;
        at = end;
        let e = Entry {
            code,
            flag,
            attempts: attempts as u32,
            extra,
        };
        out.push(match code {
            b'0' => Err(StoreError::of_script(e.text())),
            _ => answer(e),
        });
    }
    if out.len() != n {
        return Err(StoreError::Reply(format!(
            "{n} answers expected, got {}",
            out.len()
        )));
    }
    Ok(out)
}

/// The decimal number at `reply[*at..]` up to `end` (none: 0), and `*at` past `end`.
fn digits(reply: &[u8], at: &mut usize, end: u8) -> Option<u64> {
    let mut n: u64 = 0;
    loop {
        let b = *reply.get(*at)?;
        *at += 1;
        match b {
            b'0'..=b'9' => n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?,
            b if b == end => return Some(n),
            _ => return None,
        }
    }
}

fn parse_claim(e: Entry<'_>) -> Result<(Claim, Sighting), StoreError> {
    let sighting = match e.flag {
        b'1' => Sighting::First,
        b'2' => Sighting::Pair,
        _ => Sighting::Again,
    };
    let claim = match e.code {
        b'1' => Claim::Proceed {
            attempt: e.attempts,
            takeover: e.extra == b"1",
        },
        b'2' | b'6' => Claim::NotMine {
            owner: e.text(),
            owner_seen: e.code == b'2',
        },
        b'3' => Claim::Done,
        b'4' => Claim::Busy {
            retry_in: millis(e.extra),
        },
        b'5' | b'7' => Claim::Dead {
            reason: e.text(),
            letter: e.code == b'5',
        },
        other => {
            return Err(StoreError::Reply(format!(
                "claim: unknown code {:?}",
                other as char
            )))
        }
    };
    Ok((claim, sighting))
}

/// A number of milliseconds in an answer's extra (0 if absent or not a number).
fn millis(extra: &[u8]) -> Duration {
    Duration::from_millis(
        std::str::from_utf8(extra)
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0),
    )
}

fn parse_adopt(e: Entry<'_>) -> Result<Adopt, StoreError> {
    Ok(match e.code {
        b'1' => Adopt::Proceed {
            attempt: e.attempts,
            takeover: e.extra == b"1",
            adopted: e.flag == b'1',
        },
        b'2' => Adopt::OwnerSeen,
        b'3' => Adopt::Done,
        b'4' => Adopt::Busy {
            retry_in: millis(e.extra),
        },
        b'5' | b'7' => Adopt::Dead {
            reason: e.text(),
            letter: e.code == b'5',
        },
        b'8' => Adopt::Gone,
        b'9' => Adopt::NotYet {
            wait: millis(e.extra),
        },
        other => {
            return Err(StoreError::Reply(format!(
                "adopt: unknown code {:?}",
                other as char
            )))
        }
    })
}

fn parse_completion(e: Entry<'_>) -> Result<Completion, StoreError> {
    let state = State::from_code(std::str::from_utf8(&[e.flag]).unwrap_or(""));
    let need = |s: Option<State>| s.ok_or_else(|| StoreError::Reply("complete: no state".into()));
    Ok(match e.code {
        b'1' => Completion::Recorded(need(state)?),
        b'2' => Completion::Late,
        b'3' => Completion::Fenced,
        b'4' => Completion::Repeated(need(state)?),
        other => {
            return Err(StoreError::Reply(format!(
                "complete: unknown code {:?}",
                other as char
            )))
        }
    })
}

fn parse_record(
    id: &str,
    fields: Vec<(String, String)>,
    pttl: i64,
    now_ms: u64,
) -> Result<Record, StoreError> {
    let mut r = Record {
        id: id.to_owned(),
        owner: String::new(),
        state: State::Pending,
        attempts: 0,
        lease: None,
        seen: Vec::new(),
        adopted: false,
        letter: false,
        ambiguous: 0,
        overlaps: 0,
        reason: None,
        first_seen_ms: 0,
        expires_in: (pttl >= 0).then(|| Duration::from_millis(pttl as u64)),
    };
    let mut token = None;
    let mut expiry = None;
    for (k, v) in fields {
        let num = || v.parse::<u64>().unwrap_or(0);
        match k.as_str() {
            "o" => r.owner = v,
            "s" => {
                r.state = State::from_code(&v)
                    .ok_or_else(|| StoreError::Reply(format!("record {id}: state {v:?}")))?
            }
            "a" => r.attempts = num() as u32,
            "t" => token = Some(v),
            "e" => expiry = Some(num()),
            "m" => r.ambiguous = num() as u32,
            "v" => r.overlaps = num() as u32,
            "r" => r.reason = Some(v),
            "f" => r.first_seen_ms = num(),
            "@^a" => r.adopted = true,
            "@^l" => r.letter = true,
            // Other flags of later versions are not sides.
            flag if flag.starts_with("@^") => {}
            side if side.starts_with('@') => r.seen.push(side[1..].to_owned()),
            _ => {}
        }
    }
    r.seen.sort();
    if r.state == State::InFlight {
        if let (Some(t), Some(e)) = (token, expiry) {
            r.lease = Some((t, Duration::from_millis(e.saturating_sub(now_ms))));
        }
    }
    Ok(r)
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    type Answers = Vec<Result<(Claim, Sighting), StoreError>>;

    fn claims(reply: &str, n: usize) -> Result<Answers, StoreError> {
        entries(reply.as_bytes(), n, parse_claim)
    }

    #[test]
    fn claim_replies_decode() {
        let reason = "in doubt: a, b: 1:2, done\n";
        let reply = format!(
            concat!(
                "113,1:1",           // PROCEED, first sight, attempt 3, took over
                "220,5:kafka",       // NOT_MINE, pair, owned by kafka
                "301,0:",            // DONE, seen before
                "401,4:2500",        // BUSY for 2500 ms
                "522,{}:{}",         // DEAD with a reason holding the separators
                "00,11:WRONGTYPE x", // this id's own error
                "101,1:0",           // PROCEED, no takeover
            ),
            reason.len(),
            reason
        );
        let got = claims(&reply, 7).unwrap();
        let ok: Vec<_> = got
            .iter()
            .take(5)
            .map(|r| r.as_ref().unwrap().clone())
            .collect();
        assert_eq!(
            ok,
            vec![
                (
                    Claim::Proceed {
                        attempt: 3,
                        takeover: true
                    },
                    Sighting::First
                ),
                (
                    Claim::NotMine {
                        owner: "kafka".into(),
                        owner_seen: true,
                    },
                    Sighting::Pair
                ),
                (Claim::Done, Sighting::Again),
                (
                    Claim::Busy {
                        retry_in: Duration::from_millis(2500)
                    },
                    Sighting::Again
                ),
                (
                    Claim::Dead {
                        reason: reason.into(),
                        letter: true,
                    },
                    Sighting::Pair
                ),
            ]
        );
        match &got[5] {
            Err(e @ StoreError::Rejected(_)) => {
                assert!(e.to_string().contains("WRONGTYPE x"), "{e}")
            }
            other => panic!("expected the id's own error, got {other:?}"),
        }
        assert_eq!(
            got[6].as_ref().unwrap().0,
            Claim::Proceed {
                attempt: 1,
                takeover: false
            }
        );
        // A transient code is this id's to try again, not a refusal.
        assert!(matches!(
            claims("00,17:LOADING try again", 1).unwrap()[0],
            Err(StoreError::Unavailable(_))
        ));
    }

    #[test]
    fn an_unseen_owner_and_a_missing_letter_have_their_own_codes() {
        let got = claims("610,8:rocketmq702,9:in doubt!", 2).unwrap();
        assert_eq!(
            got[0].as_ref().unwrap(),
            &(
                Claim::NotMine {
                    owner: "rocketmq".into(),
                    owner_seen: false,
                },
                Sighting::First
            )
        );
        assert_eq!(
            got[1].as_ref().unwrap().0,
            Claim::Dead {
                reason: "in doubt!".into(),
                letter: false,
            }
        );
    }

    #[test]
    fn adoption_replies_decode() {
        let got = entries(
            b"112,1:0102,1:0202,0:302,0:402,3:900502,1:r702,1:r80,0:902,5:12000",
            9,
            parse_adopt,
        )
        .unwrap();
        let got: Vec<Adopt> = got.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            got,
            vec![
                Adopt::Proceed {
                    attempt: 2,
                    takeover: false,
                    adopted: true
                },
                Adopt::Proceed {
                    attempt: 2,
                    takeover: false,
                    adopted: false
                },
                Adopt::OwnerSeen,
                Adopt::Done,
                Adopt::Busy {
                    retry_in: Duration::from_millis(900)
                },
                Adopt::Dead {
                    reason: "r".into(),
                    letter: true
                },
                Adopt::Dead {
                    reason: "r".into(),
                    letter: false
                },
                Adopt::Gone,
                Adopt::NotYet {
                    wait: Duration::from_millis(12_000)
                },
            ]
        );
        assert!(entries(b"x0,0:", 1, parse_adopt).unwrap()[0].is_err());
    }

    #[test]
    fn malformed_replies_fail_the_whole_batch() {
        // Too few or too many answers, a length past the end, a bad number, an unknown code.
        for (reply, n) in [
            ("301,0:", 2),
            ("301,0:301,0:", 1),
            ("502,9:short", 1),
            ("502,18446744073709551615:x", 1),
            ("502,99999999999999999999:x", 1),
            ("30x,0:", 1),
            ("301,x:", 1),
            ("3", 1),
            ("301,0", 1),
            ("", 1),
        ] {
            assert!(claims(reply, n).is_err(), "{reply:?} as {n} answers");
        }
        assert!(claims("901,0:", 1).unwrap()[0].is_err());
        assert!(claims("", 0).unwrap().is_empty());
    }

    #[test]
    fn completion_replies_decode() {
        let got = entries(b"1p2,0:3-,0:4d1,0:2d1,0:1?2,0:", 5, parse_completion).unwrap();
        assert_eq!(
            got[0].as_ref().unwrap(),
            &Completion::Recorded(State::Pending)
        );
        assert_eq!(got[1].as_ref().unwrap(), &Completion::Fenced);
        assert_eq!(got[2].as_ref().unwrap(), &Completion::Repeated(State::Done));
        assert_eq!(got[3].as_ref().unwrap(), &Completion::Late);
        assert!(got[4].is_err(), "no such state");
    }

    #[test]
    fn record_key_puts_the_id_in_a_hash_tag() {
        assert_eq!(record_key("mqc", "order-1"), "mqc:m:{order-1}");
    }

    #[test]
    fn lease_tokens_are_unique() {
        let a = LeaseTokens::default();
        let b = LeaseTokens::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(a.next()));
            assert!(seen.insert(b.next()));
        }
    }

    #[test]
    fn record_reads_in_words() {
        let fields = [
            ("o", "kafka"),
            ("s", "i"),
            ("a", "2"),
            ("t", "ab.1"),
            ("e", "1500"),
            ("@kafka", "1"),
            ("@rocketmq", "1"),
            ("m", "1"),
            ("f", "900"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let r = parse_record("id-1", fields, 60_000, 1000).unwrap();
        assert_eq!(r.state, State::InFlight);
        assert_eq!(r.lease, Some(("ab.1".into(), Duration::from_millis(500))));
        assert_eq!(r.seen, vec!["kafka", "rocketmq"]);
        let text = r.to_string();
        assert!(text.contains("owner:     kafka"), "{text}");
        assert!(text.contains("state:     in-flight"), "{text}");
        assert!(text.contains("seen by:   kafka, rocketmq"), "{text}");
        assert!(text.contains("1 call(s) with unknown outcome"), "{text}");
    }
}
