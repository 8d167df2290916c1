//! SIGTERM or SIGINT cancels the root token: every task stops taking work and drains, within a
//! deadline that ends the process whatever still hangs ([`exit_after`]). A second signal exits
//! at once.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Exit code used when a second signal cuts the drain short (128 + SIGINT, as shells do).
pub const EXIT_ON_SECOND_SIGNAL: i32 = 130;

/// Exit code used when a drain overran its deadline and the process was ended by it.
pub const EXIT_DRAIN_OVERRAN: i32 = crate::cli::EXIT_RUNTIME;

/// Ends the process with [`EXIT_DRAIN_OVERRAN`] once `limit` has passed, unless it ended before.
/// A plain thread, not a task: it must fire even if the runtime is stuck or shutting down (the
/// runtime waits for its blocking tasks, such as a Kafka consumer being closed, without limit).
pub fn exit_after(limit: std::time::Duration) {
    let spawned = std::thread::Builder::new()
        .name("drain-deadline".into())
        .spawn(move || {
            std::thread::sleep(limit);
            tracing::error!(?limit, "the drain did not finish in time: exiting now; whatever was not acknowledged is delivered again after the restart");
            std::process::exit(EXIT_DRAIN_OVERRAN);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the drain deadline; the drain is bounded step by step only");
    }
}

/// Returns the root token, cancelled on the first SIGTERM / SIGINT.
pub fn root_token() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let root = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        root.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(EXIT_ON_SECOND_SIGNAL);
    });
    Ok(token)
}
