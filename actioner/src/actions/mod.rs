//! The actions, one module each, behind the [`Action`] trait. The executor calls them; HTTP
//! handlers never do. Every action has a dry-run description and re-checks its condition when
//! it runs.

pub mod failover;
pub mod notify;
pub mod repair;
pub mod suspend;
pub mod wake;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::alert::Alert;
use crate::buttons::Buttons;
use crate::config::{ActionKind, MacAddress};
use crate::rules::Plan;

/// An explicit wake request of the relay (`{"mac": ..., "broadcast": ..., "port": ...}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawWake {
    /// The NIC.
    pub mac: MacAddress,
    /// Where to send.
    pub broadcast: IpAddr,
    /// UDP port.
    pub port: u16,
    /// SecureOn password, if the NIC wants one.
    pub secureon: Option<MacAddress>,
}

/// One run of an action.
#[derive(Debug, Clone)]
pub struct Job {
    /// The journal key of this run.
    pub key: String,
    /// What to do.
    pub plan: Plan,
    /// The alert that caused it; `None` for manual triggers.
    pub alert: Option<Alert>,
    /// Alertmanager's URL, for links.
    pub external_url: String,
    /// The relay's explicit wake request, if that is what this is.
    pub raw_wake: Option<RawWake>,
}

/// Why a run did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// Re-checked at action time, the condition no longer holds: nothing was done.
    #[error("condition no longer true: {0}")]
    ConditionGone(String),
    /// It was tried and failed.
    #[error("{0}")]
    Failed(String),
}

/// One kind of action.
pub trait Action: Send + Sync + 'static {
    /// Which.
    fn kind(&self) -> ActionKind;

    /// Longest a run may take, retries included.
    fn timeout(&self) -> Duration;

    /// How many runs of this action may go at once (on different targets).
    fn concurrency(&self) -> usize {
        1
    }

    /// What a run would do, for dry runs.
    fn describe(&self, job: &Job) -> String;

    /// Does it; `Ok` says what was done.
    fn run<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<String, ActionError>>;

    /// The buttons this action signs onto its messages, whose presses the API then checks
    /// (notify, when `actions.notify.buttons` is set).
    fn buttons(&self) -> Option<Arc<Buttons>> {
        None
    }
}

/// The actions this actioner can run, by kind.
pub type Actions = HashMap<ActionKind, Arc<dyn Action>>;
