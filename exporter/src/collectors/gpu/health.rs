//! GPU health that outlives one sample: which GPUs this exporter has seen (so a GPU that falls
//! off the bus reads `aistack_gpu_up 0` instead of vanishing) and the XID errors NVML's event
//! thread reported for each.
//!
//! The event thread writes [`XidLog`]; the sampler writes the roster after every read; scrapes
//! read both through short locks, never waiting on NVML.
//!
//! The roster is kept in a file (`gpu.state_file`, by default `$STATE_DIRECTORY/gpus.json`
//! under systemd) when one is configured, so a GPU that fell off the bus still reads
//! `gpu_up 0` after the exporter restarts — otherwise the restart alone would resolve
//! AistackGpuLost and fail vLLM back onto a GPU that is not there. Only the GPUs' identities
//! are kept, written when one is first seen; deleting the file forgets a GPU removed on purpose.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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

    /// Counts one `xid` on `uuid` (ignored for a GPU not watched); returns the count under its
    /// label now (0 when ignored).
    pub fn record(&self, uuid: &str, xid: u64) -> u64 {
        let mut gpus = lock(&self.gpus);
        let Some(counts) = gpus.get_mut(uuid) else {
            return 0;
        };
        let key = if counts.counts.contains_key(&XidKey::Xid(xid))
            || counts.counts.len() < MAX_XIDS_PER_GPU
        {
            XidKey::Xid(xid)
        } else {
            XidKey::Other
        };
        let count = counts.counts.entry(key).or_default();
        *count += 1;
        let count = *count;
        counts.last = xid;
        count
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownGpu {
    /// NVML index when last seen.
    pub index: u32,
    /// `GPU-...`.
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Whether it answered at the last read (not kept in the file).
    #[serde(skip, default)]
    pub up: bool,
}

/// The roster file's content.
#[derive(Debug, Serialize, Deserialize)]
struct RosterFile {
    gpus: Vec<KnownGpu>,
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
    roster: Mutex<Roster>,
    xids: std::sync::Arc<XidLog>,
    /// Where the roster is kept, if anywhere.
    file: Option<PathBuf>,
    /// Held while the file is written: one write at a time.
    writing: Mutex<()>,
}

#[derive(Debug, Default)]
struct Roster {
    gpus: BTreeMap<String, KnownGpu>,
    /// GPUs from the file, joining the roster (as down, until they answer) at the first read:
    /// before it nothing is known, and the exporter shows no GPU rather than all of them down.
    remembered: Vec<KnownGpu>,
    /// The roster changed (a GPU joined or left, one's index or name) since it was written.
    unsaved: bool,
    /// After a failed write: not before then again, and the wait after that.
    retry: Option<(Instant, Duration)>,
    /// A GPU was left out for want of room (warned once).
    full_warned: bool,
}

impl Roster {
    fn join_remembered(&mut self) {
        for gpu in std::mem::take(&mut self.remembered) {
            if self.gpus.len() < MAX_KNOWN_GPUS {
                self.gpus.entry(gpu.uuid.clone()).or_insert(gpu);
            }
        }
    }

    /// Room for one more GPU: a GPU that answers wins over one that does not, so a roster full
    /// of GPUs long gone still takes a new card.
    fn make_room(&mut self) -> bool {
        if self.gpus.len() < MAX_KNOWN_GPUS {
            return true;
        }
        let down = self.gpus.values().find(|g| !g.up).map(|g| g.uuid.clone());
        match down {
            Some(uuid) => {
                tracing::warn!(collector = "gpu", %uuid, max = MAX_KNOWN_GPUS, "GPU roster full: forgetting a GPU that does not answer");
                self.gpus.remove(&uuid);
                true
            }
            None => {
                if !std::mem::replace(&mut self.full_warned, true) {
                    tracing::warn!(
                        collector = "gpu",
                        max = MAX_KNOWN_GPUS,
                        "GPU roster full of answering GPUs: a new GPU is left out of gpu_up"
                    );
                }
                false
            }
        }
    }
}

/// The wait after a failed roster write, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(600);

/// The largest roster file read (64 GPUs take about 16 KiB).
const MAX_ROSTER_BYTES: u64 = 1 << 20;

impl GpuHealth {
    /// A roster kept in `file` (`None`: in memory only), starting from what the file holds
    /// less the UUIDs in `forget`. A file that cannot be read is reported and replaced at the
    /// next write.
    pub fn new(file: Option<PathBuf>, forget: &[String]) -> Self {
        let mut remembered = file.as_deref().map(load_roster).unwrap_or_default();
        let before = remembered.len();
        remembered.retain(|g| !forget.contains(&g.uuid));
        Self {
            roster: Mutex::new(Roster {
                unsaved: remembered.len() != before,
                remembered,
                ..Roster::default()
            }),
            xids: std::sync::Arc::default(),
            file,
            writing: Mutex::new(()),
        }
    }

    /// The XID log the event thread writes.
    pub fn xid_log(&self) -> std::sync::Arc<XidLog> {
        self.xids.clone()
    }

    /// The UUIDs from the roster file not yet seen in this run.
    pub fn remembered(&self) -> Vec<String> {
        lock(&self.roster)
            .remembered
            .iter()
            .map(|g| g.uuid.clone())
            .collect()
    }

    /// After a read: `present` (index, UUID, name) answered; every other GPU seen before did
    /// not. True when the roster file is due a write (see [`GpuHealth::save`]).
    pub fn observe<'a>(&self, present: impl IntoIterator<Item = (u32, &'a str, &'a str)>) -> bool {
        let mut roster = lock(&self.roster);
        roster.join_remembered();
        for gpu in roster.gpus.values_mut() {
            gpu.up = false;
        }
        for (index, uuid, name) in present {
            if let Some(gpu) = roster.gpus.get_mut(uuid) {
                let changed = gpu.index != index || gpu.name != name;
                if changed {
                    gpu.index = index;
                    name.clone_into(&mut gpu.name);
                }
                gpu.up = true;
                roster.unsaved |= changed;
            } else if roster.make_room() {
                let gpu = KnownGpu {
                    index,
                    uuid: uuid.to_owned(),
                    name: name.to_owned(),
                    up: true,
                };
                roster.gpus.insert(uuid.to_owned(), gpu);
                roster.unsaved = true;
            }
        }
        let due = roster.retry.is_none_or(|(at, _)| Instant::now() >= at);
        roster.unsaved && due && self.file.is_some()
    }

    /// NVML as a whole stopped answering: no GPU is up.
    pub fn all_down(&self) {
        let mut roster = lock(&self.roster);
        roster.join_remembered();
        for gpu in roster.gpus.values_mut() {
            gpu.up = false;
        }
    }

    /// Writes the roster to its file if it changed since the last write: a new file beside it,
    /// synced, renamed over it, so a crash leaves the old roster or the new one. After a failed
    /// write the next is tried 10 s later, then less often, up to every 10 minutes. Blocking
    /// file I/O: call it off the async runtime (and off the sample: a sync can wait long).
    pub fn save(&self) -> io::Result<()> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        // One write at a time; one already under way (a sync stuck on a bad disk) is left to
        // finish, and this change is written after it, at a later sample: no thread waits.
        let _writing = match self.writing.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
        };
        let gpus = {
            let mut roster = lock(&self.roster);
            if !roster.unsaved {
                return Ok(());
            }
            roster.unsaved = false;
            roster.gpus.values().cloned().collect()
        };
        let written = write_roster(path, &RosterFile { gpus });
        let mut roster = lock(&self.roster);
        match &written {
            Ok(()) => roster.retry = None,
            Err(_) => {
                roster.unsaved = true;
                let delay = roster
                    .retry
                    .map_or(RETRY_FIRST, |(_, d)| (d * 2).min(RETRY_MAX));
                roster.retry = Some((Instant::now() + delay, delay));
            }
        }
        written
    }

    /// A copy of the roster and the XID counts.
    pub fn snapshot(&self) -> HealthSnapshot {
        let mut gpus: Vec<KnownGpu> = lock(&self.roster).gpus.values().cloned().collect();
        gpus.sort_by(|a, b| (a.index, &a.uuid).cmp(&(b.index, &b.uuid)));
        HealthSnapshot {
            gpus,
            xids: self.xids.snapshot(),
        }
    }
}

/// The GPUs in the roster file; none (and a warning, unless it does not exist yet) when it
/// cannot be read.
fn load_roster(path: &Path) -> Vec<KnownGpu> {
    let read = std::fs::File::open(path).and_then(|file| {
        let mut bytes = Vec::new();
        file.take(MAX_ROSTER_BYTES + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_ROSTER_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {MAX_ROSTER_BYTES} bytes"),
            ));
        }
        serde_json::from_slice::<RosterFile>(&bytes)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))
    });
    match read {
        Ok(file) => {
            let mut gpus = file.gpus;
            gpus.truncate(MAX_KNOWN_GPUS);
            gpus
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(err) => {
            tracing::warn!(collector = "gpu", path = %path.display(), error = %err, "cannot read the GPU roster; starting without it (it is written again when a GPU is seen)");
            Vec::new()
        }
    }
}

/// Writes `roster` to `path` through a new file of this process beside it (created, never
/// opened through a link someone left there), synced, then renamed over `path`.
fn write_roster(path: &Path, roster: &RosterFile) -> io::Result<()> {
    let mut text = serde_json::to_vec_pretty(roster).map_err(io::Error::other)?;
    text.push(b'\n');
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
    };
    let mut file = match create() {
        // Left by a crash of a process with this pid: ours to replace.
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(&tmp)?;
            create()?
        }
        other => other?,
    };
    let written = file
        .write_all(&text)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename is durable once the directory is; a file system that cannot sync a
    // directory (EINVAL on some FUSE mounts) still has the file renamed.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Err(err) = std::fs::File::open(dir).and_then(|d| d.sync_all())
        && err.kind() != io::ErrorKind::InvalidInput
    {
        return Err(err);
    }
    Ok(())
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

/// What the gpu collector shows while it has no sample: `aistack_nvml_up 0`, and the GPUs seen
/// before with their XID counts, as the roster has them: all down when NVML stopped answering,
/// as last read when a sample only ran late (a slow re-initialisation is not a lost GPU).
#[derive(Debug)]
pub struct HealthWhileMissing(pub std::sync::Arc<GpuHealth>);

impl crate::metrics::EncodeWhileMissing for HealthWhileMissing {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        encode_health(encoder, &self.0.snapshot())
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

    fn state(health: &GpuHealth) -> Vec<(String, bool)> {
        health
            .snapshot()
            .gpus
            .into_iter()
            .map(|g| (g.uuid, g.up))
            .collect()
    }

    #[test]
    fn a_restart_remembers_the_gpus_seen_before_from_the_roster_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpus.json");
        let health = GpuHealth::new(Some(path.clone()), &[]);
        assert!(health.observe([(0, "GPU-a", "A"), (1, "GPU-egpu", "eGPU")]));
        health.save().unwrap();
        assert!(!health.observe([(0, "GPU-a", "A")]), "nothing new to write");

        // The eGPU is unplugged, then the exporter restarts.
        let restarted = GpuHealth::new(Some(path.clone()), &[]);
        assert!(
            state(&restarted).is_empty(),
            "nothing is known before the first read"
        );
        assert!(!restarted.observe([(0, "GPU-a", "A")]));
        assert_eq!(
            state(&restarted),
            [("GPU-a".to_owned(), true), ("GPU-egpu".to_owned(), false)]
        );
        let lost = restarted.snapshot();
        let egpu = lost.lost().next().unwrap();
        assert_eq!((egpu.index, egpu.name.as_str()), (1, "eGPU"));

        // Deleting the file forgets it.
        std::fs::remove_file(&path).unwrap();
        let forgotten = GpuHealth::new(Some(path), &[]);
        forgotten.observe([(0, "GPU-a", "A")]);
        assert_eq!(state(&forgotten), [("GPU-a".to_owned(), true)]);
    }

    #[test]
    fn a_roster_file_that_cannot_be_read_or_written_loses_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpus.json");
        std::fs::write(&path, b"{not json").unwrap();
        let health = GpuHealth::new(Some(path.clone()), &[]);
        assert!(health.observe([(0, "GPU-a", "A")]));
        health.save().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("GPU-a"), "{text}");

        // A directory that is gone: the write fails, the roster stays, and is retried — not
        // at every read: 10 s later at the soonest.
        let gone = dir.path().join("gone").join("gpus.json");
        let health = GpuHealth::new(Some(gone.clone()), &[]);
        assert!(health.observe([(0, "GPU-a", "A")]));
        assert!(health.save().is_err());
        assert!(!health.observe([(0, "GPU-a", "A")]), "not due again yet");
        assert_eq!(state(&health), [("GPU-a".to_owned(), true)]);
        std::fs::create_dir(gone.parent().unwrap()).unwrap();
        health.save().unwrap();
        assert!(std::fs::read_to_string(&gone).unwrap().contains("GPU-a"));
        let leftovers: Vec<_> = std::fs::read_dir(gone.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["gpus.json"], "no temporary file left behind");
    }

    #[test]
    fn a_write_under_way_makes_the_next_one_wait_for_a_later_sample_not_a_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpus.json");
        let health = GpuHealth::new(Some(path.clone()), &[]);
        assert!(health.observe([(0, "GPU-a", "A")]));
        let stuck = health.writing.lock().unwrap();
        health.save().unwrap();
        assert!(
            !path.exists(),
            "nothing written while another write holds the file"
        );
        assert!(health.observe([(0, "GPU-a", "A")]), "still due");
        drop(stuck);
        health.save().unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().contains("GPU-a"));
        assert!(!health.observe([(0, "GPU-a", "A")]));
    }

    #[test]
    fn forgotten_gpus_leave_the_file_and_a_new_name_or_index_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpus.json");
        let health = GpuHealth::new(Some(path.clone()), &[]);
        health.observe([(0, "GPU-a", "A"), (1, "GPU-gone", "Old card")]);
        health.save().unwrap();
        assert!(!health.observe([(0, "GPU-a", "A"), (1, "GPU-gone", "Old card")]));
        assert!(
            health.observe([(1, "GPU-a", "A renamed")]),
            "index and name changes are written"
        );
        health.save().unwrap();

        let restarted = GpuHealth::new(Some(path.clone()), &["GPU-gone".to_owned()]);
        assert_eq!(restarted.remembered(), ["GPU-a"]);
        assert!(
            restarted.observe([(1, "GPU-a", "A renamed")]),
            "the file is rewritten"
        );
        restarted.save().unwrap();
        assert_eq!(state(&restarted), [("GPU-a".to_owned(), true)]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("GPU-gone") && text.contains("A renamed"),
            "{text}"
        );
    }

    #[test]
    fn a_full_roster_gives_a_gone_gpus_place_to_a_new_one() {
        let health = GpuHealth::default();
        let names: Vec<String> = (0..MAX_KNOWN_GPUS).map(|i| format!("GPU-{i}")).collect();
        health.observe(
            names
                .iter()
                .enumerate()
                .map(|(i, u)| (i as u32, u.as_str(), "X")),
        );
        // All answer: a new one is left out.
        let mut present: Vec<(u32, &str, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, u)| (i as u32, u.as_str(), "X"))
            .collect();
        present.push((99, "GPU-new", "New"));
        health.observe(present.iter().copied());
        assert!(!health.snapshot().gpus.iter().any(|g| g.uuid == "GPU-new"));
        // One is gone: the new one takes its place.
        present.remove(0);
        health.observe(present.iter().copied());
        let snapshot = health.snapshot();
        assert_eq!(snapshot.gpus.len(), MAX_KNOWN_GPUS);
        assert!(snapshot.gpus.iter().any(|g| g.uuid == "GPU-new" && g.up));
        assert!(!snapshot.gpus.iter().any(|g| g.uuid == "GPU-0"));
    }

    #[test]
    fn an_oversized_roster_file_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpus.json");
        let mut big = br#"{"gpus":[],"pad":""#.to_vec();
        big.resize(2 << 20, b' ');
        std::fs::write(&path, big).unwrap();
        let health = GpuHealth::new(Some(path), &[]);
        assert!(health.remembered().is_empty());
    }
}
