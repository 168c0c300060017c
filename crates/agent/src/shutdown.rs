//! A shutdown signal many tasks can wait on.

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// Sends the shutdown; dropping it also shuts down.
pub struct Trigger(watch::Sender<bool>);

impl Shutdown {
    pub fn new() -> (Trigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Trigger(tx), Shutdown(rx))
    }

    /// Resolves once shutdown was triggered (or the trigger dropped).
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}
