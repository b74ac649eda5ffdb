//! Polling for a condition with a deadline, instead of fixed sleeps.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often conditions are checked.
const POLL: Duration = Duration::from_millis(50);

/// Polls `check` until it returns `Some`, and returns that value. Panics naming
/// `condition` when `limit` passes first.
pub async fn until<T, F, Fut>(condition: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {} s waiting for {condition}",
                limit.as_secs_f64()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
