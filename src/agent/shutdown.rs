//! Stop requests for the daemon: from its caller through tokens, or from signals.

use tokio_util::sync::CancellationToken;

/// Stop requests for [`run`](super::run). Either token stops claiming. `drain` lets
/// running runs finish within the grace period and hands back those that do not.
/// `hand_back` stops running runs at once and returns them to the queue.
#[derive(Clone, Default)]
pub struct Shutdown {
    pub drain: CancellationToken,
    pub hand_back: CancellationToken,
}

impl Shutdown {
    /// Returns whether either stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.drain.is_cancelled() || self.hand_back.is_cancelled()
    }

    /// Completes when either stop is requested.
    pub async fn stopping(&self) {
        tokio::select! {
            _ = self.drain.cancelled() => {}
            _ = self.hand_back.cancelled() => {}
        }
    }

    /// Turns SIGTERM and SIGINT into stop requests from a thread of its own: the first
    /// signal drains, a second one hands running runs back at once.
    pub fn on_signals(&self) -> std::io::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
        let shutdown = self.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    if shutdown.drain.is_cancelled() {
                        tracing::warn!(signal, "second stop signal; handing runs back now");
                        shutdown.hand_back.cancel();
                    } else {
                        tracing::info!(signal, "stop signal received; draining");
                        shutdown.drain.cancel();
                    }
                }
            })?;
        Ok(())
    }
}
