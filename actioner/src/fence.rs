//! The fence: with leader election, the time until which this replica may still be the only
//! one acting — the renew deadline counted from the request of its last successful renewal
//! (see [`crate::ha`]). The journal checks it before every write, so a leader that was frozen
//! (SIGSTOP, a VM paused, a node stalled in swap) and wakes after another replica took over
//! writes nothing more to the shared journal — neither the end of the run it was in nor the
//! start of another — and stops. Without leader election there is no fence.
//!
//! It narrows the window to the few instructions between the check and the write; it cannot
//! stop a call to an outside system already under way when the process froze (the Kubernetes
//! API takes no fencing token). The monotonic clock runs on while a process is stopped, so a
//! frozen leader reads the deadline as passed at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Until when this replica may act; cloned to whoever must check it.
#[derive(Debug, Clone, Default)]
pub struct Fence {
    until: Option<Arc<Mutex<Instant>>>,
}

impl Fence {
    /// No fence: one replica, nothing to check.
    pub fn none() -> Self {
        Self::default()
    }

    /// A fence open until `until`.
    pub fn until(until: Instant) -> Self {
        Self {
            until: Some(Arc::new(Mutex::new(until))),
        }
    }

    /// Open until `until` now (a renewal succeeded); never moved back.
    pub fn extend(&self, until: Instant) {
        if let Some(at) = &self.until {
            let mut at = at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *at = (*at).max(until);
        }
    }

    /// `Err` with how long ago it closed, once the deadline has passed.
    pub fn check(&self) -> Result<(), Duration> {
        let Some(at) = &self.until else {
            return Ok(());
        };
        let until = *at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if now < until {
            Ok(())
        } else {
            Err(now - until)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_closes_at_its_deadline_and_moves_only_forward() {
        assert!(Fence::none().check().is_ok());
        let now = Instant::now();
        let fence = Fence::until(now + Duration::from_secs(60));
        assert!(fence.check().is_ok());
        fence.extend(now);
        assert!(fence.check().is_ok(), "never moved back");
        let closed = Fence::until(now);
        assert!(closed.check().is_err());
        let shared = closed.clone();
        closed.extend(Instant::now() + Duration::from_secs(60));
        assert!(shared.check().is_ok(), "clones see the renewal");
    }
}
