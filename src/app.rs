//! Wiring: runs one subcommand against a validated config. `run` starts the daemon's control
//! plane (switch following, Redis health, seeding the switches of a new deployment) and keeps it
//! up until the root token is cancelled; the broker sources join it in the data-path work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::arbiter::switches::{self, SwitchChange, SwitchStore, WhitelistEdit};
use crate::cli::{Command, DeadCommand, OnOff, SwitchCommand, WhitelistCommand};
use crate::config::Validated;
use crate::control::{Control, ReplayOutcome};
use crate::message::Side;
use crate::pipeline::{Pause, PauseReason, Shared};
use crate::printable::{printable_parity, printable_record, Printable};
use crate::source::{Membership, SourceContext, LAG_INTERVAL};
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

/// How long the sources get to commit and leave their groups after the pipelines drained.
const SOURCE_GRACE: Duration = Duration::from_secs(10);
/// A first SIGTERM / SIGINT ends the process within `pipeline.drain_timeout` plus this, whatever
/// Redis, the brokers or the downstream do: the sources' grace, the admin listener's and a little
/// more for the runtime to shut down.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(15);

/// Runs `command`. Output meant for the user goes to stdout; logs go to stderr.
pub async fn execute(command: Command, cfg: Validated) -> anyhow::Result<()> {
    match command {
        Command::Run => run(cfg).await,
        Command::CheckConfig => {
            println!(
                "config OK: sides {} (from {} to {}), redis {:?} {}, key prefix `{}`",
                cfg.sides
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                cfg.cutover.from,
                cfg.cutover.to,
                cfg.redis.mode,
                cfg.redis
                    .urls
                    .iter()
                    .map(|u| crate::secrets::redact_url(u))
                    .collect::<Vec<_>>()
                    .join(","),
                cfg.redis.key_prefix
            );
            for (i, side) in cfg.sides.iter().enumerate() {
                if let Some(k) = &side.kafka {
                    // Validation passed, so the check cannot fail here.
                    if let Ok(s) = crate::source::kafka_security::check(i, &k.properties) {
                        println!(
                            "side {}: Kafka {}{}",
                            side.name,
                            s.protocol,
                            s.mechanism.map(|m| format!(" {m}")).unwrap_or_default()
                        );
                    }
                }
            }
            let secrets = cfg.secret_keys();
            if !secrets.is_empty() {
                println!("secrets set (values not shown): {}", secrets.join(", "));
            }
            println!(
                "arbiter.retention {}: copies stamped earlier are parked as too old to arbitrate; \
                 keep it at least as long as the brokers keep messages, and mind Kafka's \
                 offsets.retention.minutes (a group idle longer re-reads from auto.offset.reset); \
                 adoption after {}",
                humantime::format_duration(cfg.arbiter.retention),
                humantime::format_duration(cfg.arbiter.adopt_after)
            );
            if let Some(pt) = &cfg.pipeline.pass_through {
                println!(
                    "WARNING: pipeline.pass_through: side {} forwards every copy WITHOUT arbitration (duplicates delivered); for measurement only",
                    pt.side
                );
            }
            Ok(())
        }
        Command::Switch(sc) => switch(sc, &cfg).await,
        Command::Inspect { message_id } => {
            let control = Control::connect(&cfg).await?;
            print!("{}", printable_record(control.inspect(&message_id).await?));
            Ok(())
        }
        Command::Release { message_id } => {
            let control = Control::connect(&cfg).await?;
            let reason = control
                .release(&message_id, &switches::actor("cli"))
                .await?;
            println!(
                "released {}: dead ({}) -> pending",
                Printable(&message_id),
                Printable(&reason)
            );
            Ok(())
        }
        Command::Dead(dc) => dead(dc, &cfg).await,
        Command::Parity {
            since,
            limit,
            json,
            fail_on_gap,
        } => {
            let control = Control::connect(&cfg).await?;
            let report = printable_parity(control.parity(since, limit).await?);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            if fail_on_gap && !report.is_clean() {
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Audit { count } => {
            let control = Control::connect(&cfg).await?;
            for e in control.audit(count).await? {
                println!(
                    "{}  {:<8}  {:<28}  {}",
                    fmt_ms(e.at_ms),
                    Printable(&e.action),
                    Printable(&e.by),
                    Printable(&e.detail)
                );
            }
            Ok(())
        }
    }
}

async fn switch(sc: SwitchCommand, cfg: &Validated) -> anyhow::Result<()> {
    let control = Control::connect(cfg).await?;
    let by = switches::actor("cli");
    let change = match sc {
        SwitchCommand::Show => {
            let s = control.switches().await?;
            println!("consume:   {}", if s.consume { "on" } else { "off" });
            println!("percent:   {}", s.percent);
            println!("whitelist: {} id(s)", s.whitelist.len());
            println!("version:   {}", s.version);
            println!(
                "from {} (old) to {} (new)",
                cfg.cutover.from, cfg.cutover.to
            );
            let recent = control.audit(5).await?;
            if !recent.is_empty() {
                println!("recent changes:");
                for e in recent {
                    println!(
                        "  {}  {}  {}",
                        fmt_ms(e.at_ms),
                        Printable(&e.by),
                        Printable(&e.detail)
                    );
                }
            }
            return Ok(());
        }
        SwitchCommand::Whitelist(WhitelistCommand::List) => {
            let mut ids: Vec<_> = control.switches().await?.whitelist.into_iter().collect();
            ids.sort();
            for id in ids {
                println!("{}", Printable(&id));
            }
            return Ok(());
        }
        SwitchCommand::Set(a) => SwitchChange {
            consume: a.consume.map(|c| c == OnOff::On),
            percent: a.percent,
            whitelist: None,
        },
        SwitchCommand::Whitelist(WhitelistCommand::Add { ids }) => SwitchChange {
            whitelist: Some(WhitelistEdit::Add(ids)),
            ..Default::default()
        },
        SwitchCommand::Whitelist(WhitelistCommand::Remove { ids }) => SwitchChange {
            whitelist: Some(WhitelistEdit::Remove(ids)),
            ..Default::default()
        },
    };
    match control.set_switches(&change, &by).await? {
        Some(v) => println!(
            "switches changed (version {v}): {}",
            control.switches().await?
        ),
        None => println!("nothing changed: {}", control.switches().await?),
    }
    Ok(())
}

fn fmt_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The daemon: both sources, their pipelines, the switches and Redis health, until SIGTERM /
/// SIGINT; then it drains: stop taking copies, let calls in flight finish (up to
/// `pipeline.drain_timeout`), then let the sources commit what is finished and leave.
async fn run(cfg: Validated) -> anyhow::Result<()> {
    let root = crate::shutdown::root_token().context("installing signal handlers")?;
    let store = Store::connect(&cfg.redis, true)
        .await
        .context("setting up the redis client")?;
    let metrics = Arc::new(Metrics::default());
    let plane = ControlPlane::start(&cfg, &store, &metrics, &root);
    let pause = Arc::new(Pause::counted(&metrics));
    let completer_stop = CancellationToken::new();
    let shared = Arc::new(Shared::build(
        &cfg,
        &store,
        plane.feed.clone(),
        pause.clone(),
        completer_stop.clone(),
        metrics.clone(),
    )?);
    plane.follow_the_pipeline(&cfg, &shared, &metrics, &root);
    let memberships = plane
        .serve_admin(&cfg, &store, &shared, &metrics, &pause, &root)
        .await?;
    let mut sides = start_sides(&cfg, &shared, &metrics, &pause, &memberships, &root)?;
    tracing::info!(
        from = %cfg.cutover.from,
        to = %cfg.cutover.to,
        sides = cfg.sides.len(),
        "mq-cutover running"
    );
    let failure = until_stopped(&root, &mut sides.sources).await;
    drain(&cfg, &shared, sides, completer_stop).await;
    plane.stop().await;
    tracing::info!("stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The daemon's tasks beside the data path: the Redis watchdog and health check, the switches
/// (seeded, followed, shown as gauges), the circuit and parity followers and the admin listener.
struct ControlPlane {
    tasks: TaskTracker,
    /// Not a child of the root token: a connection that wedges during the drain is replaced too.
    watchdog_stop: CancellationToken,
    feed: switches::SwitchFeed,
    redis_up: Arc<AtomicBool>,
    redis_problem: Arc<std::sync::Mutex<Option<String>>>,
}

impl ControlPlane {
    /// Starts the Redis watchdog and health check, seeds and follows the switches.
    fn start(
        cfg: &Validated,
        store: &Store,
        metrics: &Arc<Metrics>,
        root: &CancellationToken,
    ) -> ControlPlane {
        let redis_up = Arc::new(AtomicBool::new(false));
        let redis_problem: Arc<std::sync::Mutex<Option<String>>> = Default::default();
        let switch_store = SwitchStore::new(store);
        let tasks = TaskTracker::new();
        let watchdog_stop = CancellationToken::new();
        tasks.spawn(store.clone().watchdog(
            metrics.redis_reconnects_stalled.clone(),
            metrics.redis_reconnects_failover.clone(),
            watchdog_stop.clone(),
        ));
        tasks.spawn(seed_switches(
            switch_store.clone(),
            cfg.clone(),
            root.child_token(),
        ));
        tasks.spawn(watch_redis(
            store.clone(),
            cfg.arbiter.replicas,
            cfg.redis.urls.iter().any(|u| u.starts_with("rediss://")),
            redis_problem.clone(),
            redis_up.clone(),
            metrics.clone(),
            root.child_token(),
        ));
        let (feed, _follower) = switches::follow(
            switch_store,
            cfg.switches.refresh_interval,
            root.child_token(),
        );
        tasks.spawn(switch_gauges(
            feed.clone(),
            metrics.clone(),
            root.child_token(),
        ));
        ControlPlane {
            tasks,
            watchdog_stop,
            feed,
            redis_up,
            redis_problem,
        }
    }

    /// Follows the sink's circuit (pausing the sources while it is open) and, when parity is
    /// recorded, its gauges.
    fn follow_the_pipeline(
        &self,
        cfg: &Validated,
        shared: &Arc<Shared>,
        metrics: &Arc<Metrics>,
        root: &CancellationToken,
    ) {
        self.tasks
            .spawn(follow_circuit(shared.clone(), root.child_token()));
        if let Some(recorder) = &shared.parity {
            self.tasks.spawn(parity_gauges(
                recorder.parity().clone(),
                metrics.clone(),
                cfg.parity.refresh,
                root.child_token(),
            ));
        }
    }

    /// Binds `admin.listen` and serves the admin listener on it; the sides' memberships, in config
    /// order, which the sources report into and `/readyz` reads (joined, stalled).
    async fn serve_admin(
        &self,
        cfg: &Validated,
        store: &Store,
        shared: &Arc<Shared>,
        metrics: &Arc<Metrics>,
        pause: &Pause,
        root: &CancellationToken,
    ) -> anyhow::Result<Arc<[Membership]>> {
        let listener = tokio::net::TcpListener::bind(cfg.admin.listen)
            .await
            .with_context(|| format!("admin.listen: cannot listen on {}", cfg.admin.listen))?;
        let memberships: Arc<[Membership]> = cfg
            .sides
            .iter()
            .map(|side| {
                Membership::new(side.name.as_str().into(), metrics, LAG_INTERVAL)
                    .watch_stalls(cfg.pipeline.stall_after, pause.subscribe())
            })
            .collect();
        let admin_state = crate::admin::AdminState {
            metrics: metrics.clone(),
            redis_up: self.redis_up.clone(),
            redis_problem: self.redis_problem.clone(),
            switches: self.feed.clone(),
            breaker: shared.breaker.clone(),
            sources: memberships.clone(),
        };
        // Replays from the API go through this daemon's pipeline (its sink, breaker and metrics).
        let operator =
            Arc::new(Control::new(store, cfg).with_replay(shared.clone(), root.child_token()));
        let admin = crate::admin::listener(admin_state, operator, cfg);
        let admin_stop = root.child_token();
        let bound = listener.local_addr().unwrap_or(cfg.admin.listen);
        tracing::info!(listen = %bound, "admin listener: status page at /, /metrics /healthz /readyz /api");
        self.tasks.spawn(async move {
            let served = axum::serve(
                listener,
                admin.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(async move { admin_stop.cancelled().await })
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "admin listener failed");
            }
        });
        Ok(memberships)
    }

    /// Stops the watchdog last, and gives the control tasks a little time to end.
    async fn stop(self) {
        self.watchdog_stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tasks.wait()).await;
    }
}

/// The data path as it runs: per side a source, its pipeline and its adoption sweeper, the calls
/// they started, and the token that stops the sources.
struct Sides {
    sources: tokio::task::JoinSet<Result<(), crate::source::SourceError>>,
    pipelines: Vec<tokio::task::JoinHandle<()>>,
    sweepers: Vec<tokio::task::JoinHandle<()>>,
    calls: TaskTracker,
    source_stop: CancellationToken,
}

/// Starts every side: its source feeding its pipeline through an outlet with its byte budget,
/// and (unless in pass-through) its adoption sweeper.
fn start_sides(
    cfg: &Validated,
    shared: &Arc<Shared>,
    metrics: &Metrics,
    pause: &Pause,
    memberships: &[Membership],
    root: &CancellationToken,
) -> anyhow::Result<Sides> {
    if let Some(pt) = &cfg.pipeline.pass_through {
        tracing::warn!(
            side = %pt.side,
            "PASS-THROUGH MODE, FOR MEASUREMENT ONLY: this side forwards every copy WITHOUT a claim \
             and the other sides forward nothing; duplicates WILL be delivered; never run it on real traffic"
        );
    }
    let source_stop = CancellationToken::new();
    let calls = TaskTracker::new();
    let mut sources = tokio::task::JoinSet::new();
    let mut pipelines = Vec::new();
    let mut sweepers = Vec::new();
    for (side, membership) in cfg.sides.iter().zip(memberships.iter()) {
        let name: Side = side.name.as_str().into();
        let (tx, rx) = mpsc::channel(cfg.pipeline.channel);
        let gauges = metrics.side(&side.name);
        let out = crate::source::outlet::Outlet::new(
            tx,
            crate::source::outlet::ByteBudget::new(
                cfg.pipeline.max_buffered_bytes,
                Some((gauges.buffered_bytes, gauges.buffered_bytes_peak)),
            ),
        );
        let source = crate::source::build(side)?;
        // Every side reads its copies again for adoption (DESIGN.md invariant 2); pass-through
        // claims nothing, so nothing waits for adoption there.
        let refetch = source.refetcher()?;
        if cfg.pipeline.pass_through.is_none() {
            sweepers.push(tokio::spawn(crate::pipeline::adopt::sweep(
                shared.clone(),
                name.clone(),
                refetch,
                root.child_token(),
                calls.clone(),
            )));
        }
        sources.spawn(source.run(SourceContext {
            side: name.clone(),
            out,
            cancel: source_stop.clone(),
            paused: pause.subscribe(),
            membership: membership.clone(),
            max_message_bytes: cfg.pipeline.max_message_bytes,
        }));
        pipelines.push(tokio::spawn(crate::pipeline::run_side(
            shared.clone(),
            name,
            rx,
            root.child_token(),
            calls.clone(),
        )));
    }
    Ok(Sides {
        sources,
        pipelines,
        sweepers,
        calls,
        source_stop,
    })
}

/// Waits for SIGTERM / SIGINT or for a source to stop, which is a failure: it cancels the root
/// token, and is returned.
async fn until_stopped(
    root: &CancellationToken,
    sources: &mut tokio::task::JoinSet<Result<(), crate::source::SourceError>>,
) -> Option<anyhow::Error> {
    let mut failure = None;
    tokio::select! {
        _ = root.cancelled() => {}
        Some(done) = sources.join_next() => {
            let e = match done {
                Ok(Ok(())) => anyhow::anyhow!("a source stopped on its own"),
                Ok(Err(e)) => anyhow::Error::new(e),
                Err(e) => anyhow::anyhow!("a source task failed: {e}"),
            };
            tracing::error!(error = %e, "stopping");
            failure = Some(e);
            root.cancel();
        }
    }
    failure
}

/// The drain, every step bounded: the pipelines stop taking copies, the calls in flight finish
/// by `pipeline.drain_timeout`, the outcomes not recorded by then are given up, parity's last
/// sights are sent and the sources commit and leave within [`SOURCE_GRACE`].
async fn drain(cfg: &Validated, shared: &Shared, sides: Sides, completer_stop: CancellationToken) {
    let Sides {
        mut sources,
        pipelines,
        sweepers,
        calls,
        source_stop,
    } = sides;
    // Should anything hang all the same (a Redis call, a broker client, the runtime's own
    // shutdown), the process ends at this deadline.
    crate::shutdown::exit_after(cfg.pipeline.drain_timeout + SHUTDOWN_MARGIN);
    let deadline = tokio::time::Instant::now() + cfg.pipeline.drain_timeout;
    // The pipelines stop taking copies; the claims out are answered (or given up on shortly).
    if tokio::time::timeout_at(
        deadline,
        futures::future::join_all(pipelines.into_iter().chain(sweepers)),
    )
    .await
    .is_err()
    {
        tracing::warn!("pipelines still deciding claims at the drain deadline: their copies stay unacknowledged");
    }
    calls.close();
    if tokio::time::timeout_at(deadline, calls.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "calls still in flight after {:?}: their copies stay unacknowledged and their leases expire",
            cfg.pipeline.drain_timeout
        );
    }
    // Outcomes Redis has not taken by now are given up: their copies stay unacknowledged.
    completer_stop.cancel();
    source_stop.cancel();
    let parity = async {
        if let Some(recorder) = &shared.parity {
            recorder.finish(Duration::from_secs(2)).await;
        }
    };
    let sources_left = async {
        let drained = tokio::time::timeout(SOURCE_GRACE, async {
            while let Some(r) = sources.join_next().await {
                if let Ok(Err(e)) = r {
                    tracing::warn!(error = %e, "source stopped with an error");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("sources did not stop within {SOURCE_GRACE:?}");
        }
    };
    tokio::join!(parity, sources_left);
}

/// Pauses the sources while the sink's circuit is open.
async fn follow_circuit(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut states = shared.breaker.subscribe();
    loop {
        let open = states.borrow_and_update().is_open();
        shared.metrics.circuit_open.set(i64::from(open));
        shared.pause.set(PauseReason::CircuitOpen, open);
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = states.changed() => if changed.is_err() { return },
            // Open turns half-open only when someone looks: look now and then (without taking
            // the probe slot that a copy's call needs).
            _ = tokio::time::sleep(Duration::from_millis(500)), if open => {
                shared.breaker.state();
            }
        }
    }
}

/// `dead list | show | replay`.
async fn dead(dc: DeadCommand, cfg: &Validated) -> anyhow::Result<()> {
    let store = Store::connect(&cfg.redis, false).await?;
    let letters = crate::dead::DeadLetters::new(&store, cfg.dead_letters.max_len);
    match dc {
        DeadCommand::List { count } => {
            println!("{} dead letter(s)", letters.count().await?);
            let trimmed = letters.trimmed().await?;
            if trimmed > 0 {
                println!(
                    "{trimmed} older letter(s) were trimmed to keep the stream at about {} (dead_letters.max_len): \
                     their ids stay dead, `mq-cutover inspect ID` shows each",
                    letters.cap()
                );
            }
            for l in letters.list(count).await? {
                println!(
                    "{}  {:<10} {}/{}@{}  id={}  attempts={}  {}",
                    Printable(&l.entry),
                    Printable(&l.side),
                    Printable(&l.topic),
                    l.partition,
                    l.offset,
                    Printable(l.message_id.as_deref().unwrap_or("-")),
                    l.attempts,
                    Printable(&l.reason)
                );
            }
        }
        DeadCommand::Show { entry } => {
            let l = letters
                .get(&entry)
                .await?
                .with_context(|| format!("no dead letter `{entry}`"))?;
            println!("entry:       {}", Printable(&l.entry));
            println!(
                "message id:  {}",
                Printable(l.message_id.as_deref().unwrap_or("(none)"))
            );
            println!(
                "business id: {}",
                Printable(l.business_id.as_deref().unwrap_or("(none)"))
            );
            println!("reason:      {}", Printable(&l.reason));
            println!(
                "from:        {} {}/{}@{}",
                Printable(&l.side),
                Printable(&l.topic),
                l.partition,
                l.offset
            );
            println!("attempts:    {}", l.attempts);
            println!(
                "payload:     {}",
                Printable(&String::from_utf8_lossy(&l.payload))
            );
        }
        DeadCommand::Replay { entry, all } => {
            let todo = if all {
                letters.all().await?
            } else {
                let entry = entry.expect("clap requires an entry without --all");
                vec![letters
                    .get(&entry)
                    .await?
                    .with_context(|| format!("no dead letter `{entry}`"))?]
            };
            let (_tx, feed) = tokio::sync::watch::channel(None);
            let stop = CancellationToken::new();
            let shared = Arc::new(Shared::build(
                cfg,
                &store,
                feed,
                Arc::new(Pause::default()),
                stop.clone(),
                Arc::new(Metrics::default()),
            )?);
            let control = Control::new(&store, cfg).with_replay(shared, stop);
            let by = switches::actor("cli");
            let (mut done, mut again, mut skipped) = (0, 0, 0);
            for l in todo {
                let outcome = control.replay(&l, &by).await?;
                match outcome {
                    ReplayOutcome::Delivered => done += 1,
                    ReplayOutcome::ParkedAgain(_) => again += 1,
                    ReplayOutcome::Skipped(_) => skipped += 1,
                }
                let id = l.message_id.as_deref().unwrap_or("-");
                println!(
                    "{}: {}: {}",
                    Printable(&l.entry),
                    Printable(id),
                    Printable(&outcome.to_string())
                );
            }
            println!("replayed: {done} delivered, {again} parked again, {skipped} skipped");
        }
    }
    Ok(())
}

/// Writes `[switches.initial]` once, on a deployment that has no switches yet; retries until
/// Redis answers.
async fn seed_switches(store: SwitchStore, cfg: Validated, cancel: CancellationToken) {
    let by = switches::actor("config");
    let mut delay = Duration::from_millis(200);
    loop {
        match store.seed(&cfg.switches.initial, &by).await {
            Ok(Some(v)) => {
                tracing::info!(
                    version = v,
                    "no switches in redis yet: seeded from [switches.initial]"
                );
                return;
            }
            Ok(None) => return,
            Err(e) => tracing::debug!(error = %e, "cannot seed switches yet"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => delay = (delay * 2).min(Duration::from_secs(5)),
        }
    }
}

/// Keeps the switch gauges in step with the switches this instance follows.
async fn switch_gauges(
    mut feed: switches::SwitchFeed,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    loop {
        if let Some(s) = feed.borrow_and_update().clone() {
            metrics.switch_consume.set(i64::from(s.consume));
            metrics.switch_percent.set(i64::from(s.percent.get()));
            metrics.switch_whitelist.set(s.whitelist.len() as i64);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = feed.changed() => if changed.is_err() { return },
        }
    }
}

/// Keeps the parity gap gauges in step with Redis, and logs when a side's gap opens or closes.
async fn parity_gauges(
    parity: Arc<crate::parity::Parity>,
    metrics: Arc<Metrics>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut open: std::collections::HashMap<String, bool> = Default::default();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Redis away is reported by the Redis watch; the gauges keep their last values.
        let Ok(gaps) = parity.gaps().await else {
            continue;
        };
        for g in gaps {
            metrics
                .parity_one_sided
                .with_label_values(&[&g.side])
                .set(g.one_sided as i64);
            metrics
                .parity_untracked
                .with_label_values(&[&g.side])
                .set(g.untracked as i64);
            let now_open = g.one_sided > 0;
            match (open.insert(g.side.clone(), now_open), now_open) {
                (Some(false) | None, true) => tracing::warn!(side = %g.side, ids = g.one_sided,
                    grace = ?parity.grace(),
                    "parity gap: ids seen by this side only for longer than the grace period (see `mq-cutover parity`)"),
                (Some(true), false) => {
                    tracing::info!(side = %g.side, "parity gap closed")
                }
                _ => {}
            }
        }
    }
}

/// Logs each transition of Redis between reachable and unreachable (with `arbiter.replicas`,
/// also: too few replicas online to confirm a claim), and keeps the readiness flag, its reason
/// (for `/readyz`) and the gauge in step.
async fn watch_redis(
    store: Store,
    replicas: u32,
    tls: bool,
    problem: Arc<std::sync::Mutex<Option<String>>>,
    redis_up: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut up: Option<bool> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now_up = store.ready(replicas).await;
        let why = now_up.as_ref().err().map(|e| explain_redis(e, tls));
        match (&why, up) {
            (None, Some(false)) => tracing::info!("redis reachable again"),
            (None, None) => tracing::info!("redis reachable"),
            (Some(why), Some(true) | None) => {
                tracing::error!(reason = %why, "redis unreachable: no message can be claimed until it returns")
            }
            _ => {}
        }
        *problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
        up = Some(now_up.is_ok());
        redis_up.store(now_up.is_ok(), Ordering::Relaxed);
        metrics.redis_up.set(if now_up.is_ok() { 1.0 } else { 0.0 });
    }
}

/// A failure to reach Redis in words, saying what to check when the daemon's own settings are
/// the likely cause: the credentials, the CA, or TLS on one end only.
fn explain_redis(e: &crate::store::StoreError, tls: bool) -> String {
    use crate::store::StoreError;
    let (StoreError::Unavailable(r) | StoreError::Rejected(r) | StoreError::Setup(r)) = e else {
        return e.to_string();
    };
    let detail = r.to_string();
    if r.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(r.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
    {
        return format!(
            "authentication refused: {detail} (check redis.username and redis.password)"
        );
    }
    if detail.contains("certificate") || detail.contains("HandshakeFailure") {
        return format!(
            "TLS handshake failed: {detail} (check redis.tls.ca_file against the server's certificate)"
        );
    }
    if !tls
        && !r.is_connection_refusal()
        && (r.is_connection_dropped() || detail.contains("reset by peer"))
    {
        return format!(
            "the server closed the connection: {detail} (a redis:// URL for a TLS port? use rediss://)"
        );
    }
    if tls && r.is_timeout() {
        return format!(
            "no answer to the TLS handshake: {detail} (a rediss:// URL for a plaintext port? use redis://)"
        );
    }
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    fn unavailable(kind: redis::ErrorKind, detail: &str) -> StoreError {
        StoreError::Unavailable(redis::RedisError::from((kind, "x", detail.to_owned())))
    }

    #[test]
    fn redis_failures_say_what_to_check() {
        let io = |e: std::io::Error| StoreError::Unavailable(redis::RedisError::from(e));
        let auth = explain_redis(
            &unavailable(redis::ErrorKind::AuthenticationFailed, "WRONGPASS"),
            true,
        );
        assert!(
            auth.contains("check redis.username and redis.password"),
            "{auth}"
        );
        let tls = explain_redis(
            &io(std::io::Error::other(
                "invalid peer certificate: UnknownIssuer",
            )),
            true,
        );
        assert!(
            tls.starts_with("TLS handshake failed") && tls.contains("redis.tls.ca_file"),
            "{tls}"
        );
        let plain = explain_redis(
            &io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            false,
        );
        assert!(plain.contains("use rediss://"), "{plain}");
        let down = explain_redis(
            &io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            false,
        );
        assert!(
            !down.contains("rediss") && !down.contains("check"),
            "{down}"
        );
    }
}
