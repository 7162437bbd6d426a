//! `suspend`: puts this host to sleep through systemd-logind on the system D-Bus
//! (`DBUS_SYSTEM_BUS_ADDRESS` honoured), as configured: suspend, hibernate, hybrid sleep or
//! suspend-then-hibernate, never interactively.
//!
//! Right before acting it re-checks, and does nothing when any check fails:
//! 1. the host was not woken less than `resume_grace` ago by this actioner's last suspend (a
//!    stale alert must not send a just-woken host back to sleep);
//! 2. the exporter's `GET /api/v1/idle` says `suspend_ready`;
//! 3. logind holds no block inhibitor on sleep;
//! 4. logind's `Can<Mode>` answers "yes" (polkit allows it without a password).
//!
//! The executor journals "started" before the call. logind answers before the machine sleeps,
//! so a run normally ends "succeeded"; should the process stop while the call is in flight,
//! the next start journals the run as interrupted (failed), and it is not retried.

use std::sync::Mutex;
use std::time::Duration;

use aistack_common::login1::{ManagerProxy, blocks_sleep};
use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::{Action, ActionError, Job};
use crate::config::{ActionKind, SuspendConfig, SuspendMode};

/// CLOCK_MONOTONIC: time awake since boot (it stands still while the host sleeps).
fn awake() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[derive(Debug, Deserialize)]
struct IdleReport {
    state: String,
    suspend_ready: bool,
    #[serde(default)]
    gating_reasons: Vec<String>,
}

/// Suspends this host.
#[derive(Debug)]
pub struct Suspend {
    mode: SuspendMode,
    resume_grace: Duration,
    idle_url: String,
    client: reqwest::Client,
    bus_address: Option<String>,
    /// CLOCK_MONOTONIC when this actioner last asked logind to sleep.
    last_call: Mutex<Option<Duration>>,
}

impl Suspend {
    /// Re-checks with the exporter at `exporter_url`; talks to logind on the system bus, or on
    /// `bus_address` when given.
    pub fn new(
        config: &SuspendConfig,
        exporter_url: &str,
        bus_address: Option<String>,
    ) -> Result<Self, String> {
        aistack_common::install_tls_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            mode: config.mode,
            resume_grace: config.resume_grace.into(),
            idle_url: format!("{}/api/v1/idle", exporter_url.trim_end_matches('/')),
            client,
            bus_address,
            last_call: Mutex::new(None),
        })
    }

    fn mode_name(&self) -> &'static str {
        match self.mode {
            SuspendMode::Suspend => "Suspend",
            SuspendMode::Hibernate => "Hibernate",
            SuspendMode::HybridSleep => "HybridSleep",
            SuspendMode::SuspendThenHibernate => "SuspendThenHibernate",
        }
    }

    async fn exporter_says_ready(&self) -> Result<(), ActionError> {
        let response = self.client.get(&self.idle_url).send().await.map_err(|e| {
            ActionError::ConditionGone(format!("cannot ask the exporter ({}): {e}", self.idle_url))
        })?;
        if !response.status().is_success() {
            return Err(ActionError::ConditionGone(format!(
                "the exporter answered {}",
                response.status()
            )));
        }
        let report: IdleReport = response.json().await.map_err(|e| {
            ActionError::ConditionGone(format!("unexpected answer from the exporter: {e}"))
        })?;
        if report.suspend_ready {
            Ok(())
        } else {
            let why = if report.gating_reasons.is_empty() {
                format!("state {}", report.state)
            } else {
                report.gating_reasons.join("; ")
            };
            Err(ActionError::ConditionGone(format!(
                "the exporter says not ready to suspend: {why}"
            )))
        }
    }

    async fn logind(&self) -> Result<zbus::Connection, ActionError> {
        let connected = match &self.bus_address {
            Some(address) => match zbus::connection::Builder::address(address.as_str()) {
                Ok(builder) => builder.build().await,
                Err(e) => Err(e),
            },
            None => aistack_common::login1::system_bus().await,
        };
        connected.map_err(|e| ActionError::Failed(format!("system bus unreachable: {e}")))
    }

    async fn suspend(&self) -> Result<String, ActionError> {
        let woken = self
            .last_call
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .map(|at| awake().saturating_sub(at));
        if let Some(since) = woken.filter(|s| *s < self.resume_grace) {
            return Err(ActionError::ConditionGone(format!(
                "this host was put to sleep {}s of awake time ago; grace {}s",
                since.as_secs(),
                self.resume_grace.as_secs()
            )));
        }
        self.exporter_says_ready().await?;
        let connection = self.logind().await?;
        let failed = |e: zbus::Error| ActionError::Failed(format!("logind: {e}"));
        let manager = ManagerProxy::new(&connection).await.map_err(failed)?;
        let inhibitors = manager.list_inhibitors().await.map_err(failed)?;
        if let Some((_, who, why, ..)) = inhibitors
            .iter()
            .find(|(what, _, _, mode, ..)| blocks_sleep(what, mode))
        {
            return Err(ActionError::ConditionGone(format!(
                "inhibitor: {who} ({why})"
            )));
        }
        let can = match self.mode {
            SuspendMode::Suspend => manager.can_suspend().await,
            SuspendMode::Hibernate => manager.can_hibernate().await,
            SuspendMode::HybridSleep => manager.can_hybrid_sleep().await,
            SuspendMode::SuspendThenHibernate => manager.can_suspend_then_hibernate().await,
        }
        .map_err(failed)?;
        if can != "yes" {
            let hint = if can == "challenge" {
                " (needs a polkit rule for this user; see docs/actioner.md)"
            } else {
                ""
            };
            return Err(ActionError::Failed(format!(
                "logind says Can{}={can}{hint}",
                self.mode_name()
            )));
        }
        *self
            .last_call
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(awake());
        let call = match self.mode {
            SuspendMode::Suspend => manager.suspend(false).await,
            SuspendMode::Hibernate => manager.hibernate(false).await,
            SuspendMode::HybridSleep => manager.hybrid_sleep(false).await,
            SuspendMode::SuspendThenHibernate => manager.suspend_then_hibernate(false).await,
        };
        call.map_err(failed)?;
        Ok(format!("{} requested from logind", self.mode_name()))
    }
}

impl Action for Suspend {
    fn kind(&self) -> ActionKind {
        ActionKind::Suspend
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(30)
    }

    fn describe(&self, _job: &Job) -> String {
        format!(
            "would call logind {}(false) if {} says suspend_ready and no block inhibitor is held",
            self.mode_name(),
            self.idle_url
        )
    }

    fn run<'a>(&'a self, _job: &'a Job) -> BoxFuture<'a, Result<String, ActionError>> {
        Box::pin(self.suspend())
    }
}
