//! `suspend`: puts this host to sleep through systemd-logind on the system D-Bus
//! (`DBUS_SYSTEM_BUS_ADDRESS` honoured), as configured: suspend, hibernate, hybrid sleep or
//! suspend-then-hibernate, never interactively.
//!
//! Right before acting it re-checks, and does nothing when any check fails:
//! 1. the host has been awake at least `resume_grace` since this actioner last asked it to
//!    sleep (a stale alert must not send a just-woken host back to sleep). The journal keeps
//!    the boot and CLOCK_MONOTONIC of each suspend's start, so a restarted actioner knows too;
//!    a reboot ends the grace;
//! 2. the exporter's `GET /api/v1/idle` says `suspend_ready`;
//! 3. logind holds no block inhibitor on sleep;
//! 4. logind's `Can<Mode>` answers "yes" (polkit allows it without a password).
//!
//! The executor journals "started" before the call. logind answers before the machine sleeps,
//! so a run normally ends "succeeded"; should the process stop while the call is in flight,
//! the next start journals the run as interrupted (failed), and it is not retried.

use std::time::Duration;

use aistack_common::api::{IDLE_PATH, IdleReport};
use aistack_common::login1::{ManagerProxy, blocks_sleep};
use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::{Action, ActionError, Job, RunContext, SetupError, recheck_client};
use crate::exporter::ExporterUrl;
use crate::vocab::{ActionKind, AwakeStamp};
use aistack_common::config::HumanDuration;

/// `actions.suspend`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SuspendConfig {
    /// Which logind sleep (default suspend).
    pub mode: SuspendMode,
    /// After this actioner suspended the host, refuse to suspend it again until it has been
    /// awake this long, whatever stale alert arrives (default 15m).
    pub resume_grace: HumanDuration,
}

impl Default for SuspendConfig {
    fn default() -> Self {
        Self {
            mode: SuspendMode::Suspend,
            resume_grace: HumanDuration::from_secs(15 * 60),
        }
    }
}

/// `actions.suspend.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SuspendMode {
    /// Suspend to RAM.
    #[default]
    Suspend,
    /// Suspend to disk.
    Hibernate,
    /// Both at once.
    HybridSleep,
    /// Suspend, then hibernate after a delay.
    SuspendThenHibernate,
}

impl SuspendMode {
    /// logind's name for it (`Suspend`, `CanSuspend`).
    pub const fn logind_name(self) -> &'static str {
        match self {
            Self::Suspend => "Suspend",
            Self::Hibernate => "Hibernate",
            Self::HybridSleep => "HybridSleep",
            Self::SuspendThenHibernate => "SuspendThenHibernate",
        }
    }
}

/// Suspends this host.
#[derive(Debug)]
pub struct Suspend {
    mode: SuspendMode,
    resume_grace: Duration,
    /// This host's exporter's idle report, or why it cannot be named.
    idle_url: Result<String, String>,
    client: reqwest::Client,
    bus_address: Option<String>,
}

impl Suspend {
    /// Re-checks with this host's exporter (`exporter` for the node `this_host`: suspend acts
    /// only for this host); talks to logind on the system bus, or on `bus_address` when given.
    pub fn new(
        config: &SuspendConfig,
        exporter: &ExporterUrl,
        this_host: &str,
        bus_address: Option<String>,
    ) -> Result<Self, SetupError> {
        Ok(Self {
            mode: config.mode,
            resume_grace: config.resume_grace.into(),
            idle_url: exporter.url(Some(this_host), IDLE_PATH).inspect_err(|why| {
                tracing::warn!(
                    action = "suspend",
                    "suspend cannot re-check with the exporter, and will refuse: {why}"
                );
            }),
            client: recheck_client(Duration::from_secs(3), Duration::from_secs(5))?,
            bus_address,
        })
    }

    async fn exporter_says_ready(&self) -> Result<(), ActionError> {
        let url = self
            .idle_url
            .as_ref()
            .map_err(|why| ActionError::ConditionGone(format!("cannot ask the exporter: {why}")))?;
        let response = self.client.get(url).send().await.map_err(|e| {
            ActionError::ConditionGone(format!("cannot ask the exporter ({url}): {e}"))
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
        match report.not_ready_because() {
            None => Ok(()),
            Some(why) => Err(ActionError::ConditionGone(format!(
                "the exporter says not ready to suspend: {why}"
            ))),
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

    async fn suspend(&self, context: &RunContext) -> Result<String, ActionError> {
        let awake = context
            .last_suspend
            .as_ref()
            .and_then(|then| then.awake_since(&AwakeStamp::now()));
        if let Some(since) = awake.filter(|s| *s < self.resume_grace) {
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
                self.mode.logind_name()
            )));
        }
        let call = match self.mode {
            SuspendMode::Suspend => manager.suspend(false).await,
            SuspendMode::Hibernate => manager.hibernate(false).await,
            SuspendMode::HybridSleep => manager.hybrid_sleep(false).await,
            SuspendMode::SuspendThenHibernate => manager.suspend_then_hibernate(false).await,
        };
        call.map_err(failed)?;
        Ok(format!("{} requested from logind", self.mode.logind_name()))
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
            self.mode.logind_name(),
            match &self.idle_url {
                Ok(url) => url.clone(),
                Err(why) => format!("the exporter (it cannot: {why})"),
            }
        )
    }

    fn run<'a>(
        &'a self,
        _job: &'a Job,
        context: &'a RunContext,
    ) -> BoxFuture<'a, Result<String, ActionError>> {
        Box::pin(self.suspend(context))
    }
}
