//! The actions, one module each, behind the [`Action`] trait, each with its own config. The
//! executor calls them; HTTP handlers never do. Every action has a dry-run description and
//! re-checks its condition when it runs.

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
use crate::journal::AlertRef;
use crate::vocab::{ActionKind, AwakeStamp, MacAddress, Plan, RunKey};

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
    pub key: RunKey,
    /// What to do.
    pub plan: Plan,
    /// The alert that caused it, whole (for notify); `None` for runs a person asked for.
    pub alert: Option<Arc<Alert>>,
    /// The alert as the journal names it (kept for a deferred failback too).
    pub alert_ref: Option<AlertRef>,
    /// Alertmanager's URL, for links.
    pub external_url: Arc<str>,
    /// The relay's explicit wake request, if that is what this is.
    pub raw_wake: Option<RawWake>,
    /// A manual failback that skips the GPU check (`"force": true`).
    pub force: bool,
    /// The node the run is about, for re-checks on that node's exporter: the alert's host, or
    /// the one a person named.
    pub node: Option<String>,
}

/// What the executor knows when a run begins, from the ledger.
#[derive(Debug, Clone, Default)]
pub struct RunContext {
    /// Where the host stood when a suspend last started before this run.
    pub last_suspend: Option<AwakeStamp>,
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

impl From<crate::docker::DockerError> for ActionError {
    fn from(err: crate::docker::DockerError) -> Self {
        Self::Failed(err.to_string())
    }
}

impl From<crate::kubernetes::KubeError> for ActionError {
    fn from(err: crate::kubernetes::KubeError) -> Self {
        Self::Failed(err.to_string())
    }
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
    fn run<'a>(
        &'a self,
        job: &'a Job,
        context: &'a RunContext,
    ) -> BoxFuture<'a, Result<String, ActionError>>;
}

/// The actions this actioner can run, by kind.
pub type Actions = HashMap<ActionKind, Arc<dyn Action>>;

/// Why an action could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Its HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    /// A secret file could not be read.
    #[error("reading {}: {source}", path.display())]
    Secret {
        /// The file.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A pattern (checked by check-config first).
    #[error("invalid pattern: {0}")]
    Pattern(#[from] regex::Error),
}

/// An HTTP client for re-checks and notifications, with connect and whole-request timeouts.
pub fn http_client(connect: Duration, total: Duration) -> Result<reqwest::Client, SetupError> {
    Ok(aistack_common::http_client(|builder| {
        builder.connect_timeout(connect).timeout(total)
    })?)
}

/// [`http_client`] for re-checks on an exporter: no redirects, so an address built from an
/// alert's labels cannot lead the request anywhere else.
pub fn recheck_client(connect: Duration, total: Duration) -> Result<reqwest::Client, SetupError> {
    Ok(aistack_common::http_client(|builder| {
        builder
            .connect_timeout(connect)
            .timeout(total)
            .redirect(reqwest::redirect::Policy::none())
    })?)
}
