//! SIGTERM or SIGINT cancels the root token: every task stops taking work and drains. A second
//! signal exits at once.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Exit code used when a second signal cuts the drain short (128 + SIGINT, as shells do).
pub const EXIT_ON_SECOND_SIGNAL: i32 = 130;

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
