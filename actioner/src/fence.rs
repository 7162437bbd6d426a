//! The fence: with leader election, the time until which this replica may still be the only
//! one acting — the renew deadline counted from the request of its last successful renewal
//! (see [`crate::ha`]). The journal checks it before every write and rotation, and the Docker
//! and Kubernetes clients before every call, so a leader that was frozen (SIGSTOP, a VM
//! paused, a node stalled in swap, or suspended) and wakes after another replica took over
//! writes nothing more to the shared journal — neither the end of the run it was in nor the
//! start of another — calls nothing more, and stops. Without leader election there is no
//! fence.
//!
//! The clock is the boot-time clock (`CLOCK_BOOTTIME`): it runs on while the process is
//! stopped and while the machine sleeps, so a leader woken from either reads its deadline as
//! passed at once (the monotonic clock stands still during a suspend).
//!
//! It narrows the window to the few instructions between a check and the call or write it
//! guards; it cannot stop a call already under way when the process froze (the Kubernetes API
//! takes no fencing token), nor the actions that are not fenced (suspend, wake, notify).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::time::{ClockId, clock_gettime};

/// The boot-time clock now: time since boot, suspends included.
pub fn now() -> Duration {
    let t = clock_gettime(ClockId::Boottime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Until when (on the boot-time clock) this replica may act; cloned to whoever must check.
#[derive(Debug, Clone, Default)]
pub struct Fence {
    until: Option<Arc<Mutex<Duration>>>,
}

impl Fence {
    /// No fence: one replica, nothing to check.
    pub fn none() -> Self {
        Self::default()
    }

    /// A fence open until `until` on the boot-time clock ([`now`]).
    pub fn until(until: Duration) -> Self {
        Self {
            until: Some(Arc::new(Mutex::new(until))),
        }
    }

    /// Open until `until` now (a renewal succeeded); never moved back.
    pub fn extend(&self, until: Duration) {
        if let Some(at) = &self.until {
            let mut at = at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *at = (*at).max(until);
        }
    }

    /// `Err` with how long ago it closed, once the deadline has passed.
    pub fn check(&self) -> Result<(), Duration> {
        self.check_at(now())
    }

    /// [`Fence::check`] at `now` on the boot-time clock.
    pub fn check_at(&self, now: Duration) -> Result<(), Duration> {
        let Some(at) = &self.until else {
            return Ok(());
        };
        let until = *at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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
        let start = now();
        let fence = Fence::until(start + Duration::from_secs(60));
        assert!(fence.check().is_ok());
        fence.extend(start);
        assert!(fence.check().is_ok(), "never moved back");
        // A machine that slept past the deadline: the boot-time clock jumped.
        assert_eq!(
            fence.check_at(start + Duration::from_secs(90)),
            Err(Duration::from_secs(30))
        );
        let closed = Fence::until(start);
        assert!(closed.check().is_err());
        let shared = closed.clone();
        closed.extend(now() + Duration::from_secs(60));
        assert!(shared.check().is_ok(), "clones see the renewal");
    }

    #[test]
    fn the_boot_time_clock_counts_on() {
        let a = now();
        std::thread::sleep(Duration::from_millis(20));
        let b = now();
        assert!(b >= a + Duration::from_millis(20), "{a:?} {b:?}");
        assert!(a > Duration::ZERO);
    }
}
