//! GPU health that outlives one sample: which GPUs this exporter has seen (so a GPU that falls
//! off the bus reads `aistack_gpu_up 0` instead of vanishing) and the XID errors NVML's event
//! thread reported for each.
//!
//! The event thread writes [`XidLog`]; the sampler writes the roster after every read; scrapes
//! read both through short locks, never waiting on NVML.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};

use super::GpuLabels;
use crate::metrics::{counter_family, gauge_family};

/// XIDs whose counters start at 0 for every watched GPU, so `increase()` sees their first
/// occurrence: the ones the shipped alerts name (79 fallen off the bus; 48, 63, 64, 92, 94, 95
/// memory errors). Others appear when they first happen.
pub const ALERTED_XIDS: [u64; 7] = [48, 63, 64, 79, 92, 94, 95];

/// Distinct XID values counted per GPU; more are summed as `xid="other"`, so a driver sending
/// garbage cannot grow the series without bound.
pub const MAX_XIDS_PER_GPU: usize = 64;

/// GPUs remembered; a host with more is not one this exporter is for, and the bound keeps a
/// churning roster (MIG reconfigurations, say) finite.
pub const MAX_KNOWN_GPUS: usize = 64;

/// The XID label: a number, or "other" past [`MAX_XIDS_PER_GPU`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum XidKey {
    /// An XID value as the driver reported it.
    Xid(u64),
    /// Values beyond the per-GPU bound.
    Other,
}

impl fmt::Display for XidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Xid(xid) => write!(f, "{xid}"),
            Self::Other => f.write_str("other"),
        }
    }
}

/// One GPU's XID errors since the exporter started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XidCounts {
    /// Errors by XID.
    pub counts: BTreeMap<XidKey, u64>,
    /// The last XID reported, 0 before the first (dcgm-exporter's `DCGM_FI_DEV_XID_ERRORS`).
    pub last: u64,
}

/// XID errors per GPU UUID, for GPUs whose events are watched.
#[derive(Debug, Default)]
pub struct XidLog {
    gpus: Mutex<BTreeMap<String, XidCounts>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl XidLog {
    /// Starts watching `uuid` (again): its alerted XIDs show 0 until they happen. Counts kept
    /// from an earlier watch stay (the counter must not go back).
    pub fn watching(&self, uuid: &str) {
        let mut gpus = lock(&self.gpus);
        if !gpus.contains_key(uuid) && gpus.len() >= MAX_KNOWN_GPUS {
            return;
        }
        let counts = gpus.entry(uuid.to_owned()).or_default();
        for xid in ALERTED_XIDS {
            counts.counts.entry(XidKey::Xid(xid)).or_insert(0);
        }
    }

    /// Counts one `xid` on `uuid` (ignored for a GPU not watched).
    pub fn record(&self, uuid: &str, xid: u64) {
        let mut gpus = lock(&self.gpus);
        let Some(counts) = gpus.get_mut(uuid) else {
            return;
        };
        let key = if counts.counts.contains_key(&XidKey::Xid(xid))
            || counts.counts.len() < MAX_XIDS_PER_GPU
        {
            XidKey::Xid(xid)
        } else {
            XidKey::Other
        };
        *counts.counts.entry(key).or_default() += 1;
        counts.last = xid;
    }

    /// The UUIDs watched now or before.
    pub fn watched(&self) -> Vec<String> {
        lock(&self.gpus).keys().cloned().collect()
    }

    /// A copy of every GPU's counts.
    pub fn snapshot(&self) -> BTreeMap<String, XidCounts> {
        lock(&self.gpus).clone()
    }
}

/// A GPU this exporter has seen, as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownGpu {
    /// NVML index when last seen.
    pub index: u32,
    /// `GPU-...`.
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Whether it answered at the last read.
    pub up: bool,
}

impl KnownGpu {
    pub(super) fn labels(&self) -> GpuLabels {
        GpuLabels {
            gpu: self.index.to_string(),
            uuid: self.uuid.clone(),
            name: self.name.clone(),
        }
    }
}

/// What the health families show: every GPU seen since start, and their XIDs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HealthSnapshot {
    /// Every GPU seen since the exporter started, by UUID.
    pub gpus: Vec<KnownGpu>,
    /// XID counts of the watched GPUs, by UUID.
    pub xids: BTreeMap<String, XidCounts>,
}

impl HealthSnapshot {
    /// The GPUs that stopped answering.
    pub fn lost(&self) -> impl Iterator<Item = &KnownGpu> {
        self.gpus.iter().filter(|g| !g.up)
    }
}

/// The roster of GPUs seen and the XID log, shared by the sampler, the event thread and scrapes.
#[derive(Debug, Default)]
pub struct GpuHealth {
    roster: Mutex<BTreeMap<String, KnownGpu>>,
    xids: std::sync::Arc<XidLog>,
}

impl GpuHealth {
    /// The XID log the event thread writes.
    pub fn xid_log(&self) -> std::sync::Arc<XidLog> {
        self.xids.clone()
    }

    /// After a read: `present` (index, UUID, name) answered; every other GPU seen before did not.
    pub fn observe<'a>(&self, present: impl IntoIterator<Item = (u32, &'a str, &'a str)>) {
        let mut roster = lock(&self.roster);
        for gpu in roster.values_mut() {
            gpu.up = false;
        }
        for (index, uuid, name) in present {
            if let Some(gpu) = roster.get_mut(uuid) {
                (gpu.index, gpu.up) = (index, true);
                if gpu.name != name {
                    name.clone_into(&mut gpu.name);
                }
            } else if roster.len() < MAX_KNOWN_GPUS {
                let gpu = KnownGpu {
                    index,
                    uuid: uuid.to_owned(),
                    name: name.to_owned(),
                    up: true,
                };
                roster.insert(uuid.to_owned(), gpu);
            }
        }
    }

    /// NVML as a whole stopped answering: no GPU is up.
    pub fn all_down(&self) {
        for gpu in lock(&self.roster).values_mut() {
            gpu.up = false;
        }
    }

    /// A copy of the roster and the XID counts.
    pub fn snapshot(&self) -> HealthSnapshot {
        let mut gpus: Vec<KnownGpu> = lock(&self.roster).values().cloned().collect();
        gpus.sort_by(|a, b| (a.index, &a.uuid).cmp(&(b.index, &b.uuid)));
        HealthSnapshot {
            gpus,
            xids: self.xids.snapshot(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct XidLabel {
    xid: String,
}

/// Encodes `aistack_gpu_up`, `aistack_gpu_xid_errors_total` and `aistack_gpu_last_xid`.
pub fn encode_health(encoder: &mut DescriptorEncoder, health: &HealthSnapshot) -> fmt::Result {
    gauge_family(
        encoder,
        "gpu_up",
        "1 when the GPU answered NVML at the last sample; 0 for a GPU seen since the exporter started that no longer answers (fallen off the bus, unplugged, or NVML down).",
        None,
        health
            .gpus
            .iter()
            .map(|g| (g.labels(), if g.up { 1.0 } else { 0.0 })),
    )?;
    let watched = || {
        health
            .gpus
            .iter()
            .filter_map(|g| health.xids.get(&g.uuid).map(|x| (g, x)))
    };
    counter_family(
        encoder,
        "gpu_xid_errors",
        "XID errors the driver reported for the GPU since the exporter started, by XID (see docs/gpu.md).",
        None,
        watched().flat_map(|(g, x)| {
            x.counts.iter().map(move |(xid, n)| {
                let xid = XidLabel {
                    xid: xid.to_string(),
                };
                ((g.labels(), xid), *n as f64)
            })
        }),
    )?;
    gauge_family(
        encoder,
        "gpu_last_xid",
        "The last XID error the driver reported for the GPU, 0 before the first.",
        None,
        watched().map(|(g, x)| (g.labels(), x.last as f64)),
    )
}

/// What the gpu collector shows while NVML does not answer: `aistack_nvml_up 0`, and the
/// GPUs seen before as down, with their XID counts.
#[derive(Debug)]
pub struct HealthWhileMissing(pub std::sync::Arc<GpuHealth>);

impl crate::metrics::EncodeWhileMissing for HealthWhileMissing {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let mut health = self.0.snapshot();
        for gpu in &mut health.gpus {
            gpu.up = false;
        }
        encode_health(encoder, &health)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerted_xids_start_at_zero_and_counts_survive_a_new_watch() {
        let log = XidLog::default();
        log.record("GPU-a", 79);
        assert!(log.snapshot().is_empty(), "an unwatched GPU is not counted");
        log.watching("GPU-a");
        log.record("GPU-a", 79);
        log.record("GPU-a", 13);
        log.watching("GPU-a");
        let counts = &log.snapshot()["GPU-a"];
        assert_eq!(counts.counts[&XidKey::Xid(79)], 1);
        assert_eq!(counts.counts[&XidKey::Xid(13)], 1);
        assert_eq!(counts.counts[&XidKey::Xid(48)], 0);
        assert_eq!(counts.last, 13);
    }

    #[test]
    fn distinct_xids_are_bounded() {
        let log = XidLog::default();
        log.watching("GPU-a");
        for xid in 1000..3000 {
            log.record("GPU-a", xid);
        }
        let counts = &log.snapshot()["GPU-a"];
        assert_eq!(counts.counts.len(), MAX_XIDS_PER_GPU + 1);
        let total: u64 = counts.counts.values().sum();
        assert_eq!(total, 2000, "nothing is dropped, only summed");
        assert_eq!(counts.last, 2999);
    }

    #[test]
    fn a_gpu_that_stops_answering_stays_as_down_and_comes_back() {
        let health = GpuHealth::default();
        health.observe([(0, "GPU-a", "A"), (1, "GPU-b", "B")]);
        health.observe([(0, "GPU-b", "B")]);
        let snapshot = health.snapshot();
        let state: Vec<_> = snapshot
            .gpus
            .iter()
            .map(|g| (g.index, g.uuid.as_str(), g.up))
            .collect();
        assert_eq!(state, [(0, "GPU-a", false), (0, "GPU-b", true)]);
        health.observe([(0, "GPU-a", "A"), (1, "GPU-b", "B")]);
        assert!(health.snapshot().lost().next().is_none());
        health.all_down();
        assert_eq!(health.snapshot().lost().count(), 2);
    }
}
