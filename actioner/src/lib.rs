//! aistack-actioner: receives Alertmanager webhooks and acts on GPU hosts, safely.
//!
//! `main` loads and checks the config and calls [`Actioner::start`]: the journal is read back,
//! the recorder (the one task that decides and journals) and the executor (which runs actions
//! off the request path) start, and [`http::app`] serves the API.

pub mod actions;
pub mod alert;
pub mod auth;
pub mod buttons;
pub mod cli;
pub mod config;
pub mod docker;
pub mod executor;
pub mod http;
pub mod journal;
pub mod kubernetes;
pub mod metrics;
pub mod recorder;
pub mod rules;
pub mod wol;

use std::sync::Arc;
use std::time::Duration;

use aistack_common::config::{ConfigError, Problems};
use axum::Router;
use tokio::sync::mpsc;

use crate::actions::Actions;
use crate::actions::failover::Failover;
use crate::actions::notify::Notify;
use crate::actions::repair::Repair;
use crate::actions::suspend::Suspend;
use crate::actions::wake::Wake;
use crate::auth::Auth;
use crate::buttons::Buttons;
use crate::config::{ActionKind, Config};
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::recorder::Recorder;
use crate::rules::RuleSet;

/// Every problem with the config's secret files (the bearer token is required), as a
/// [`ConfigError`] naming `path`.
pub fn check_files(config: &Config, path: &std::path::Path) -> Result<(), ConfigError> {
    let mut problems = Problems::default();
    config.check_files(&mut problems);
    let problems = problems.into_vec();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }
}

/// The journal rotates past this size.
pub const JOURNAL_MAX_BYTES: u64 = 16 << 20;
/// Rotated journal files kept.
pub const JOURNAL_KEEP: usize = 4;
/// Commands the recorder may have waiting before webhooks are answered 503.
pub const RECORDER_INBOX: usize = 1024;

/// Why the actioner could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The journal could not be opened.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// Replaying or extending it failed.
    #[error(transparent)]
    Record(#[from] recorder::RecordError),
    /// An action could not be set up.
    #[error("setting up the {action} action: {why}")]
    Action {
        /// Which.
        action: ActionKind,
        /// Why.
        why: String,
    },
    /// A rule's pattern (checked by check-config first).
    #[error("invalid pattern: {0}")]
    Pattern(#[from] regex::Error),
}

/// The actions the config enables.
pub fn build_actions(config: &Config) -> Result<Actions, StartError> {
    let mut actions: Actions = Actions::new();
    let wake = Wake::new(&config.actions.wake).map_err(|why| StartError::Action {
        action: ActionKind::Wake,
        why,
    })?;
    actions.insert(ActionKind::Wake, Arc::new(wake));
    let suspend =
        Suspend::new(&config.actions.suspend, &config.exporter_url, None).map_err(|why| {
            StartError::Action {
                action: ActionKind::Suspend,
                why,
            }
        })?;
    actions.insert(ActionKind::Suspend, Arc::new(suspend));
    let docker = crate::docker::DockerControl::new(&config.docker.socket);
    let kube = crate::kubernetes::KubeControl::new();
    for (kind, to_fallback) in [(ActionKind::Failover, true), (ActionKind::Failback, false)] {
        let action = Failover::new(
            to_fallback,
            &config.actions.failover,
            docker.clone(),
            kube.clone(),
            &config.exporter_url,
        )
        .map_err(|why| StartError::Action { action: kind, why })?;
        actions.insert(kind, Arc::new(action));
    }
    actions.insert(
        ActionKind::Repair,
        Arc::new(Repair::new(&config.actions.repair, docker, kube)),
    );
    if let Some(ntfy) = &config.actions.notify.ntfy {
        let notify_error = |why| StartError::Action {
            action: ActionKind::Notify,
            why,
        };
        let buttons = Buttons::new(config).map_err(notify_error)?;
        let notify = Notify::new(ntfy, buttons.map(Arc::new), Duration::from_secs(60))
            .map_err(notify_error)?;
        actions.insert(ActionKind::Notify, Arc::new(notify));
    }
    Ok(actions)
}

/// A running actioner.
#[derive(Debug)]
pub struct Actioner {
    /// What to serve.
    pub router: Router,
    /// The recorder, for tests and benchmarks.
    pub recorder: Recorder,
    /// Its metrics.
    pub metrics: Metrics,
}

impl Actioner {
    /// Reads back the journal and starts the recorder and the executor (inside a Tokio
    /// runtime) with the given actions.
    pub fn start(config: &Config, auth: Auth, actions: Actions) -> Result<Self, StartError> {
        let (journal, history) = Journal::open(&config.state_dir, JOURNAL_MAX_BYTES, JOURNAL_KEEP)?;
        tracing::info!(state_dir = %config.state_dir.display(), entries = history.len(), "journal read back");
        let rules = RuleSet::new(config)?;
        let metrics = Metrics::new();
        // Every series a rule or a button can move exists from the start, at 0: increase()
        // and rate() see the first failure too.
        let offers = config.actions.notify.buttons.iter().flat_map(|b| &b.offer);
        metrics.init_actions(
            config
                .rules
                .iter()
                .map(|r| r.action.name())
                .chain(offers.map(|o| o.action.name())),
        );
        let (jobs_tx, jobs_rx) = mpsc::channel(executor::QUEUE);
        let recorder = Recorder::start(
            journal,
            history,
            rules,
            jobs_tx,
            metrics.clone(),
            RECORDER_INBOX,
        )?;
        // Presses are checked with the key notify signs with.
        let buttons = actions
            .get(&ActionKind::Notify)
            .and_then(|notify| notify.buttons());
        executor::spawn(actions, recorder.clone(), metrics.clone(), jobs_rx);
        let state = http::AppState::new(
            metrics.clone(),
            recorder.clone(),
            auth,
            config.limits.max_body_bytes,
        )
        .with_buttons(buttons);
        Ok(Self {
            router: http::app(state),
            recorder,
            metrics,
        })
    }
}
