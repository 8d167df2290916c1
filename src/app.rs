//! Wiring: runs one subcommand against a validated config. `run` starts the daemon's control
//! plane (switch following, Redis health, seeding the switches of a new deployment) and keeps it
//! up until the root token is cancelled; the broker sources join it in the data-path work.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::arbiter::switches::{self, SwitchChange, SwitchStore, WhitelistEdit};
use crate::cli::{Command, OnOff, SwitchCommand, WhitelistCommand};
use crate::config::Validated;
use crate::control::Control;
use crate::store::Store;

/// How long `run` waits for its tasks after the signal.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

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
                cfg.redis.urls.join(","),
                cfg.redis.key_prefix
            );
            Ok(())
        }
        Command::Switch(sc) => switch(sc, &cfg).await,
        Command::Inspect { message_id } => {
            let control = Control::connect(&cfg).await?;
            print!("{}", control.inspect(&message_id).await?);
            Ok(())
        }
        Command::Release { message_id } => {
            let control = Control::connect(&cfg).await?;
            let reason = control
                .release(&message_id, &switches::actor("cli"))
                .await?;
            println!("released {message_id}: dead ({reason}) -> pending");
            Ok(())
        }
        Command::Audit { count } => {
            let control = Control::connect(&cfg).await?;
            for e in control.audit(count).await? {
                println!(
                    "{}  {:<8}  {:<28}  {}",
                    fmt_ms(e.at_ms),
                    e.action,
                    e.by,
                    e.detail
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
                    println!("  {}  {}  {}", fmt_ms(e.at_ms), e.by, e.detail);
                }
            }
            return Ok(());
        }
        SwitchCommand::Whitelist(WhitelistCommand::List) => {
            let mut ids: Vec<_> = control.switches().await?.whitelist.into_iter().collect();
            ids.sort();
            for id in ids {
                println!("{id}");
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

/// The daemon: follows the switches and watches Redis until the root token is cancelled.
async fn run(cfg: Validated) -> anyhow::Result<()> {
    let root = crate::shutdown::root_token().context("installing signal handlers")?;
    let store = Store::connect(&cfg.redis, true)
        .await
        .context("setting up the redis client")?;
    let switch_store = SwitchStore::new(&store);
    let tracker = TaskTracker::new();

    tracker.spawn(seed_switches(
        switch_store.clone(),
        cfg.clone(),
        root.child_token(),
    ));
    tracker.spawn(watch_redis(store.clone(), root.child_token()));
    let (_feed, follower) = switches::follow(
        switch_store,
        cfg.switches.refresh_interval,
        root.child_token(),
    );
    tracker.spawn(async move {
        let _ = follower.await;
    });
    tracker.close();
    tracing::info!(
        from = %cfg.cutover.from,
        to = %cfg.cutover.to,
        "mq-cutover running (control plane: switches and redis health)"
    );
    root.cancelled().await;
    if tokio::time::timeout(DRAIN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("tasks did not stop within {DRAIN_GRACE:?}");
    }
    tracing::info!("stopped");
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

/// Logs each transition of Redis between reachable and unreachable.
async fn watch_redis(store: Store, cancel: CancellationToken) {
    let mut up: Option<bool> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now_up = store.ping().await;
        match (&now_up, up) {
            (Ok(()), Some(false)) => tracing::info!("redis reachable again"),
            (Ok(()), None) => tracing::info!("redis reachable"),
            (Err(e), Some(true) | None) => {
                tracing::error!(error = %e, "redis unreachable: no message can be claimed until it returns")
            }
            _ => {}
        }
        up = Some(now_up.is_ok());
    }
}
