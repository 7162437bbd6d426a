//! `wake`: a Wake-on-LAN magic packet to an allowlisted host (or, through the relay endpoint,
//! to an explicit MAC the caller is authorised to wake).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{Action, ActionError, Job, RawWake};
use crate::config::{ActionKind, MacAddress, WakeConfig};
use crate::wol;

/// Sends magic packets.
#[derive(Debug)]
pub struct Wake {
    targets: BTreeMap<String, RawWake>,
}

impl Wake {
    /// The allowlisted targets from the config (validated: MACs and addresses parse).
    pub fn new(config: &WakeConfig) -> Result<Self, String> {
        let targets = config
            .targets
            .iter()
            .map(|(name, t)| {
                let mac: MacAddress = t.mac.parse()?;
                let broadcast: IpAddr = t.broadcast.parse().map_err(|e| format!("{name}: {e}"))?;
                let secureon = t
                    .secureon
                    .as_deref()
                    .map(str::parse::<MacAddress>)
                    .transpose()?;
                Ok((
                    name.clone(),
                    RawWake {
                        mac,
                        broadcast,
                        port: t.port,
                        secureon,
                    },
                ))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { targets })
    }

    fn resolve(&self, job: &Job) -> Result<RawWake, ActionError> {
        if let Some(raw) = job.raw_wake {
            return Ok(raw);
        }
        let name = job.plan.target.as_deref().unwrap_or_default();
        self.targets
            .get(name)
            .copied()
            .ok_or_else(|| ActionError::Failed(format!("{name:?} is not a wake target")))
    }
}

impl Action for Wake {
    fn kind(&self) -> ActionKind {
        ActionKind::Wake
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(5)
    }

    fn concurrency(&self) -> usize {
        4
    }

    fn describe(&self, job: &Job) -> String {
        match self.resolve(job) {
            Ok(t) => format!(
                "would send a magic packet for {} to {}:{}",
                t.mac, t.broadcast, t.port
            ),
            Err(err) => format!("would fail: {err}"),
        }
    }

    fn run<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<String, ActionError>> {
        Box::pin(async move {
            let t = self.resolve(job)?;
            let packet = wol::magic_packet(t.mac, t.secureon.as_ref().map(|p| &p.0[..]));
            tokio::task::spawn_blocking(move || wol::send(&packet, t.broadcast, t.port))
                .await
                .map_err(|e| ActionError::Failed(e.to_string()))?
                .map_err(|e| {
                    ActionError::Failed(format!("sending to {}:{}: {e}", t.broadcast, t.port))
                })?;
            Ok(format!(
                "magic packet for {} sent to {}:{}",
                t.mac, t.broadcast, t.port
            ))
        })
    }
}
