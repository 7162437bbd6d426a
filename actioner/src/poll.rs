//! Waiting for something to become true: a health URL to answer, a container to report
//! healthy, a Deployment to roll out. One loop, so every wait has the same shape — probe,
//! sleep, give up at the deadline with the last thing seen.

use std::time::Duration;

use tokio::time::Instant;

/// Calls `probe` every `interval` until it gives `Ok` or `timeout` has passed (it is called
/// at least once). `Ok` carries the value and how long it took; `Err` the last failure.
pub async fn until<T, L, F, Fut>(
    timeout: Duration,
    interval: Duration,
    mut probe: F,
) -> Result<(T, Duration), L>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, L>>,
{
    let started = Instant::now();
    loop {
        let last = match probe().await {
            Ok(value) => return Ok((value, started.elapsed())),
            Err(last) => last,
        };
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(last);
        }
        tokio::time::sleep(interval.min(left)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn it_probes_until_true_or_the_deadline() {
        let calls = Cell::new(0);
        let found = until(Duration::from_secs(10), Duration::from_secs(1), || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move { if n == 3 { Ok(n) } else { Err(n) } }
        })
        .await;
        assert_eq!(found, Ok((3, Duration::from_secs(2))));
        let never = until(
            Duration::from_millis(2500),
            Duration::from_secs(1),
            || async { Err::<(), _>("still starting") },
        )
        .await;
        assert_eq!(never, Err("still starting"));
        let once = until(Duration::ZERO, Duration::from_secs(1), || async {
            Err::<(), _>(1)
        })
        .await;
        assert_eq!(once, Err(1));
    }
}
