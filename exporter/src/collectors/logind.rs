//! `logind`: inhibitor locks and sessions from systemd-logind over the system D-Bus
//! (`DBUS_SYSTEM_BUS_ADDRESS` honoured), for `logind_*` and the idle engine's gates.
//!
//! No bus or no logind is `logind_up 0`; the connection is made again on the next cycle.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use aistack_common::login1::{ManagerProxy, SessionProxy};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use zbus::proxy::CacheProperties;

use super::{Collector, CollectorError, EncodeSample};
use crate::metrics::{gauge, gauge_family};

/// An inhibitor lock.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Inhibitor {
    /// Colon-separated operations it inhibits: `sleep`, `shutdown`, `idle`, `handle-lid-switch` ...
    pub what: String,
    /// Who holds it (a program's name).
    pub who: String,
    /// Why, in its words.
    pub why: String,
    /// `block` or `delay`.
    pub mode: String,
}

impl Inhibitor {
    /// Whether it stops the host from sleeping (a `block` lock on `sleep`).
    pub fn blocks_sleep(&self) -> bool {
        aistack_common::login1::blocks_sleep(&self.what, &self.mode)
    }
}

/// A login session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Session id.
    pub id: String,
    /// User name.
    pub user: String,
    /// `user`, `greeter`, `lock-screen`, `background` ...
    pub class: String,
    /// Remote (SSH) or local.
    pub remote: bool,
    /// The remote host, when remote.
    pub remote_host: String,
}

/// One `logind` sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LogindSample {
    /// Every inhibitor lock held now.
    pub inhibitors: Vec<Inhibitor>,
    /// Every session.
    pub sessions: Vec<SessionInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct InhibitorLabels {
    who: String,
    why: String,
    what: String,
    mode: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SessionLabels {
    class: String,
    remote: &'static str,
}

const LOGIND_UP_HELP: &str = "1 when systemd-logind answers on the system bus, 0 otherwise.";

impl EncodeSample for LogindSample {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        gauge(encoder, "logind_up", LOGIND_UP_HELP, None, 1.0)?;
        let mut inhibitors: BTreeMap<&Inhibitor, f64> = BTreeMap::new();
        for i in &self.inhibitors {
            *inhibitors.entry(i).or_default() += 1.0;
        }
        gauge_family(
            encoder,
            "logind_inhibitors",
            "Inhibitor locks held, by holder, reason, what they inhibit and mode (block or delay).",
            None,
            inhibitors.into_iter().map(|(i, n)| {
                let labels = InhibitorLabels {
                    who: i.who.clone(),
                    why: i.why.clone(),
                    what: i.what.clone(),
                    mode: i.mode.clone(),
                };
                (labels, n)
            }),
        )?;
        let mut sessions: BTreeMap<(&str, bool), f64> = BTreeMap::new();
        for s in &self.sessions {
            *sessions.entry((s.class.as_str(), s.remote)).or_default() += 1.0;
        }
        gauge_family(
            encoder,
            "logind_sessions",
            "Login sessions, by class and whether they are remote.",
            None,
            sessions.into_iter().map(|((class, remote), n)| {
                let labels = SessionLabels {
                    class: class.to_owned(),
                    remote: if remote { "true" } else { "false" },
                };
                (labels, n)
            }),
        )
    }

    fn encode_missing(encoder: &mut DescriptorEncoder) -> fmt::Result {
        gauge(encoder, "logind_up", LOGIND_UP_HELP, None, 0.0)
    }
}

/// Reads inhibitors and sessions from logind.
#[derive(Debug, Default)]
pub struct LogindCollector {
    connection: Option<zbus::Connection>,
    up: Option<bool>,
}

impl LogindCollector {
    /// Connects on first use.
    pub fn new() -> Self {
        Self::default()
    }

    async fn read(connection: &zbus::Connection) -> zbus::Result<LogindSample> {
        let manager = ManagerProxy::new(connection).await?;
        let inhibitors = manager
            .list_inhibitors()
            .await?
            .into_iter()
            .map(|(what, who, why, mode, _uid, _pid)| Inhibitor {
                what,
                who,
                why,
                mode,
            })
            .collect();
        let mut sessions = Vec::new();
        for (id, _uid, user, _seat, path) in manager.list_sessions().await? {
            let session = SessionProxy::builder(connection)
                .path(path)?
                .cache_properties(CacheProperties::No)
                .build()
                .await?;
            // A session that ends between the list and this call is simply gone.
            let (Ok(class), Ok(remote)) = (session.class().await, session.remote().await) else {
                continue;
            };
            let remote_host = if remote {
                session.remote_host().await.unwrap_or_default()
            } else {
                String::new()
            };
            sessions.push(SessionInfo {
                id,
                user,
                class,
                remote,
                remote_host,
            });
        }
        Ok(LogindSample {
            inhibitors,
            sessions,
        })
    }

    fn note_up(&mut self, up: bool, reason: &str) {
        match (self.up, up) {
            (None, false) => {
                tracing::info!(collector = "logind", %reason, "systemd-logind not reachable; idle gates on inhibitors and sessions are off until it is")
            }
            (Some(true), false) => {
                tracing::warn!(collector = "logind", %reason, "systemd-logind went away")
            }
            (Some(false), true) => tracing::info!(collector = "logind", "systemd-logind is back"),
            _ => {}
        }
        self.up = Some(up);
    }
}

impl Collector for LogindCollector {
    type Sample = LogindSample;

    async fn sample(&mut self, _now: Instant) -> Result<LogindSample, CollectorError> {
        let connection = match self.connection.clone() {
            Some(connection) => connection,
            None => match aistack_common::login1::system_bus().await {
                Ok(connection) => connection,
                Err(err) => {
                    self.note_up(false, &err.to_string());
                    return Err(CollectorError::NoData(format!(
                        "system bus unreachable: {err}"
                    )));
                }
            },
        };
        match Self::read(&connection).await {
            Ok(sample) => {
                self.connection = Some(connection);
                self.note_up(true, "");
                Ok(sample)
            }
            Err(err) => {
                self.connection = None;
                self.note_up(false, &err.to_string());
                Err(CollectorError::NoData(format!("logind: {err}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inhibitor(what: &str, mode: &str) -> Inhibitor {
        Inhibitor {
            what: what.into(),
            who: "x".into(),
            why: "y".into(),
            mode: mode.into(),
        }
    }

    #[test]
    fn only_block_locks_on_sleep_block_sleep() {
        assert!(inhibitor("sleep", "block").blocks_sleep());
        assert!(inhibitor("shutdown:sleep:idle", "block").blocks_sleep());
        assert!(!inhibitor("sleep", "delay").blocks_sleep());
        assert!(!inhibitor("handle-lid-switch", "block").blocks_sleep());
        assert!(!inhibitor("sleepy", "block").blocks_sleep());
    }

    /// logind lists one lock per holder: two identical locks (two Steam downloads, two SSH
    /// sessions) are one series counting 2, never two series.
    #[test]
    fn identical_locks_and_sessions_are_one_series_with_a_count() {
        let session = |id: &str| SessionInfo {
            id: id.into(),
            user: "alice".into(),
            class: "user".into(),
            remote: true,
            remote_host: "10.0.0.5".into(),
        };
        let sample = LogindSample {
            inhibitors: vec![
                inhibitor("sleep", "block"),
                inhibitor("sleep", "block"),
                inhibitor("sleep", "delay"),
            ],
            sessions: vec![session("3"), session("4")],
        };
        let text = crate::collectors::encode_text(sample);
        let series: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            series,
            [
                "aistack_logind_up 1.0",
                r#"aistack_logind_inhibitors{who="x",why="y",what="sleep",mode="block"} 2.0"#,
                r#"aistack_logind_inhibitors{who="x",why="y",what="sleep",mode="delay"} 1.0"#,
                r#"aistack_logind_sessions{class="user",remote="true"} 2.0"#,
            ],
            "{text}"
        );
    }
}
