//! aistack-actioner: receives Alertmanager webhooks and acts on GPU hosts, safely.
//!
//! `main` loads and checks the config, builds the actions and calls [`Actioner::start`]: the
//! journal is streamed into the [`ledger::Ledger`], the recorder (the one task that decides,
//! by the [`policy::Policy`], and journals) and the executor (which runs actions off the
//! request path) start, and [`http::app`] serves the API.
//!
//! Modules, bottom up: [`vocab`] and [`alert`] (words and wire types everyone shares), the
//! [`actions`] with their configs, [`config`], [`rules`], [`journal`], [`ledger`], [`policy`],
//! [`recorder`], [`executor`], [`http`].

pub mod actions;
pub mod alert;
pub mod auth;
pub mod cli;
pub mod config;
pub mod docker;
pub mod executor;
pub mod exporter;
pub mod fence;
pub mod ha;
pub mod http;
pub mod journal;
pub mod kubernetes;
pub mod ledger;
pub mod metrics;
pub mod planner;
pub mod policy;
pub mod poll;
pub mod prerequisites;
pub mod recorder;
pub mod rules;
pub mod throttle;
pub mod vocab;
pub mod wol;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aistack_common::config::{ConfigError, Problems};
use axum::Router;
use tokio::sync::{mpsc, watch};

use crate::actions::failover::Failover;
use crate::actions::notify::Notify;
use crate::actions::notify::buttons::Buttons;
use crate::actions::repair::Repair;
use crate::actions::suspend::Suspend;
use crate::actions::wake::Wake;
use crate::actions::{Actions, SetupError};
use crate::auth::Auth;
use crate::config::Config;
use crate::fence::Fence;
use crate::http::RelayGate;
use crate::journal::{Journal, JournalLimits};
use crate::ledger::{Ledger, Snapshot};
use crate::metrics::Metrics;
use crate::policy::{Policy, RepairBudget};
use crate::recorder::Recorder;
use crate::rules::RuleSet;
use crate::throttle::Throttle;
use crate::vocab::ActionKind;

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

/// Commands the recorder may have waiting before webhooks are answered 503.
pub const RECORDER_INBOX: usize = 1024;

/// Why the actioner could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The journal could not be opened or read.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// Extending it failed.
    #[error(transparent)]
    Record(#[from] recorder::RecordError),
    /// An action could not be set up.
    #[error("setting up the {action} action: {source}")]
    Action {
        /// Which.
        action: ActionKind,
        /// Why.
        source: SetupError,
    },
    /// A rule's pattern (checked by check-config first).
    #[error("invalid pattern: {0}")]
    Pattern(#[from] regex::Error),
}

/// The actions the config enables, and the buttons notify signs (the API checks presses
/// with the same key).
#[derive(Clone)]
pub struct BuiltActions {
    /// By kind.
    pub actions: Actions,
    /// `actions.notify.buttons`, when set.
    pub buttons: Option<Arc<Buttons>>,
}

/// The actions the config enables.
pub fn build_actions(config: &Config) -> Result<BuiltActions, StartError> {
    build_actions_fenced(config, &Fence::none())
}

/// As [`build_actions`], for the leader of several replicas: the Docker engine and the
/// Kubernetes API are called only while `fence` is open.
pub fn build_actions_fenced(config: &Config, fence: &Fence) -> Result<BuiltActions, StartError> {
    let setup = |action| move |source| StartError::Action { action, source };
    let mut actions: Actions = Actions::new();
    actions.insert(ActionKind::Wake, Arc::new(Wake::new(&config.actions.wake)));
    let exporter = crate::exporter::ExporterUrl::new(&config.exporter_url);
    let this_host = config.allowlists().host;
    let suspend = Suspend::new(&config.actions.suspend, &exporter, &this_host, None)
        .map_err(setup(ActionKind::Suspend))?;
    actions.insert(ActionKind::Suspend, Arc::new(suspend));
    let docker = crate::docker::DockerControl::new(&config.docker.socket).fenced(fence.clone());
    let kube = crate::kubernetes::KubeControl::new().fenced(fence.clone());
    for (kind, to_fallback) in [(ActionKind::Failover, true), (ActionKind::Failback, false)] {
        let action = Failover::new(
            to_fallback,
            &config.actions.failover,
            docker.clone(),
            kube.clone(),
            &exporter,
            &config.gpu_nodes,
        )
        .map_err(setup(kind))?;
        if let Some(action) = action {
            actions.insert(kind, Arc::new(action));
        }
    }
    actions.insert(
        ActionKind::Repair,
        Arc::new(Repair::new(&config.actions.repair, docker, kube)),
    );
    let mut buttons = None;
    if let Some(ntfy) = &config.actions.notify.ntfy {
        buttons = config
            .actions
            .notify
            .buttons
            .as_ref()
            .map(|b| Buttons::new(b, config.allowlists()).map(Arc::new))
            .transpose()
            .map_err(setup(ActionKind::Notify))?;
        let notify = Notify::new(ntfy, buttons.clone(), Duration::from_secs(60))
            .map_err(setup(ActionKind::Notify))?;
        actions.insert(ActionKind::Notify, Arc::new(notify));
    }
    Ok(BuiltActions { actions, buttons })
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
    /// Streams the journal back and starts the recorder and the executor (inside a Tokio
    /// runtime) with the given actions.
    pub fn start(config: &Config, auth: Auth, built: BuiltActions) -> Result<Self, StartError> {
        Self::start_with(config, auth, built, config.limits.journal())
    }

    /// As [`Actioner::start`], for the leader of several replicas: it writes the journal, and
    /// so acts, only while `fence` is open, and stops once it finds it closed.
    pub fn start_fenced(
        config: &Config,
        auth: Auth,
        built: BuiltActions,
        fence: Fence,
    ) -> Result<Self, StartError> {
        Self::open(config, auth, built, config.limits.journal(), fence)
    }

    /// As [`Actioner::start`], with the journal's limits given.
    pub fn start_with(
        config: &Config,
        auth: Auth,
        built: BuiltActions,
        limits: JournalLimits,
    ) -> Result<Self, StartError> {
        Self::open(config, auth, built, limits, Fence::none())
    }

    fn open(
        config: &Config,
        auth: Auth,
        built: BuiltActions,
        limits: JournalLimits,
        fence: Fence,
    ) -> Result<Self, StartError> {
        let opened = Instant::now();
        let mut ledger = Ledger::new(config.actions.notify.buttons.is_some());
        let (journal, stats) = Journal::open(&config.state_dir, limits, |e| ledger.apply(e))?;
        let journal = journal.fenced(fence);
        tracing::info!(
            state_dir = %config.state_dir.display(),
            files = stats.files,
            entries = stats.entries,
            skipped = stats.invalid + stats.out_of_order,
            once_only_keys = ledger.remembered(),
            took_ms = opened.elapsed().as_millis(),
            "journal read back"
        );
        let allowlists = config.allowlists();
        for pair in ledger.on_fallback() {
            if !allowlists.has_pair(pair) {
                let pair = if pair.is_empty() {
                    "the cluster's (actions.failover.kubernetes or docker)"
                } else {
                    pair
                };
                tracing::warn!(
                    pair,
                    "the journal says this vLLM/Ollama pair is on its fallback, but the config has no such pair now: nothing fails it back; move it back by hand"
                );
            }
        }
        let rules = RuleSet::new(config)?;
        let repair = &config.actions.repair;
        let budget = RepairBudget {
            max_attempts: repair.max_attempts,
            window: repair.window.into(),
        };
        let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
        let metrics = Metrics::new(snapshot_rx);
        metrics.journal_lines_skipped(stats.invalid + stats.out_of_order);
        // Every series a rule or a button can move exists from the start, at 0: increase()
        // and rate() see the first failure too.
        let offers = config.actions.notify.buttons.iter().flat_map(|b| &b.offer);
        metrics.init_actions(rules.actions().chain(offers.map(|o| o.action)));
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let recorder = Recorder::start(
            journal,
            ledger,
            Policy::new(rules, budget),
            jobs_tx,
            metrics.clone(),
            snapshot_tx,
            RECORDER_INBOX,
        )?;
        executor::spawn(built.actions, recorder.clone(), metrics.clone(), jobs_rx);
        let relay = &config.actions.wake.relay;
        let gate = RelayGate {
            destinations: config.actions.wake.relay_destinations(),
            throttle: Throttle::new(relay.per_client_per_minute, relay.total_per_minute),
        };
        let state = http::AppState::new(
            metrics.clone(),
            recorder.clone(),
            auth,
            config.limits.max_body_bytes,
            gate,
        )
        .with_buttons(built.buttons)
        .with_per_node(
            crate::exporter::ExporterUrl::new(&config.exporter_url).per_node()
                && config.actions.failover.nodes.is_empty(),
        );
        Ok(Self {
            router: http::app(state),
            recorder,
            metrics,
        })
    }
}
