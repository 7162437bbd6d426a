//! The collector framework, in node_exporter's spirit: one module per collector, each sampling
//! in its own background task on its own interval, with a timeout.
//!
//! A sample is an immutable value published on a `watch` channel; `/metrics` encodes the latest
//! one (see [`crate::metrics`]) and never waits on hardware. Other parts (the power estimate, the
//! idle engine) subscribe to the same channels.

pub mod cpu;
pub mod docker;
pub mod gpu;
pub mod hwmon;
pub mod idle;
pub mod logind;
pub mod power;
pub mod rapl;
pub mod services;
pub mod wol;

use std::fmt;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt as _;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelValue, LabelValueEncoder};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

/// Every collector this exporter has; the flag and config names come from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CollectorKind {
    /// CPU utilization from /proc/stat.
    Cpu,
    /// CPU package energy and power from RAPL (powercap).
    Rapl,
    /// Temperatures from hwmon.
    Hwmon,
    /// NVIDIA GPUs through NVML.
    Gpu,
    /// The Docker engine and its containers.
    Docker,
    /// HTTP health of the inference services.
    Services,
    /// Wake-on-LAN readiness of the network interfaces.
    Wol,
    /// Inhibitors and sessions from systemd-logind.
    Logind,
    /// The idle engine.
    Idle,
    /// The host power estimate and its energy counter.
    Power,
}

impl CollectorKind {
    /// All collectors, in the order they are listed in `--help` and encoded.
    pub const ALL: [CollectorKind; 10] = [
        Self::Cpu,
        Self::Rapl,
        Self::Hwmon,
        Self::Gpu,
        Self::Power,
        Self::Docker,
        Self::Services,
        Self::Wol,
        Self::Logind,
        Self::Idle,
    ];

    /// The name used in flags (`--collector.cpu`), config keys and the `collector` label.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Rapl => "rapl",
            Self::Hwmon => "hwmon",
            Self::Gpu => "gpu",
            Self::Docker => "docker",
            Self::Services => "services",
            Self::Wol => "wol",
            Self::Logind => "logind",
            Self::Idle => "idle",
            Self::Power => "power",
        }
    }

    /// What the collector exposes, for `--help`.
    pub const fn description(self) -> &'static str {
        match self {
            Self::Cpu => "CPU utilization from /proc/stat",
            Self::Rapl => "CPU package energy and power from RAPL (powercap)",
            Self::Hwmon => "hardware monitor temperatures",
            Self::Gpu => "NVIDIA GPUs through NVML, with per-process memory",
            Self::Docker => "the Docker engine and its containers' state, health and restarts",
            Self::Services => {
                "HTTP health, models and loaded VRAM of vLLM, Ollama, Open WebUI, LocalAI"
            }
            Self::Wol => "whether Wake-on-LAN by magic packet is armed on the network interfaces",
            Self::Logind => "inhibitor locks and sessions from systemd-logind over D-Bus",
            Self::Idle => "the idle engine: is this host idle, may it be suspended, what blocks it",
            Self::Power => "estimated host power and energy",
        }
    }

    /// Whether the collector runs when neither flags nor config say otherwise.
    pub const fn enabled_by_default(self) -> bool {
        true
    }

    /// Sampling interval when the config does not set one.
    pub const fn default_interval(self) -> Duration {
        match self {
            Self::Cpu | Self::Rapl | Self::Gpu | Self::Power | Self::Idle => Duration::from_secs(1),
            // Some hwmon drivers read over I2C/SMBus and take milliseconds per sensor.
            Self::Hwmon => Duration::from_secs(5),
            Self::Docker => Duration::from_secs(10),
            Self::Services => Duration::from_secs(5),
            // Wake-on settings change when someone runs ethtool or a driver reloads.
            Self::Wol => Duration::from_secs(60),
            Self::Logind => Duration::from_secs(5),
        }
    }
}

impl fmt::Display for CollectorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl EncodeLabelValue for CollectorKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        EncodeLabelValue::encode(&self.name(), encoder)
    }
}

/// Why a sample produced nothing.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// The source is absent or not readable here (no RAPL, not root, no hwmon chip): logged at
    /// debug, as node_exporter does, because it is how the host is, not a fault.
    #[error("no data: {0}")]
    NoData(String),
    /// Reading a file failed for another reason.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A file (or a kernel reply) held something we could not parse.
    #[error("parsing {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong: the parser's own error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The sample did not finish within the collector's timeout.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// The sample panicked: a bug, reported rather than taking the exporter down.
    #[error("panicked: {0}")]
    Panicked(String),
}

impl CollectorError {
    /// Maps a failed read of `path`: absent or permission denied is "no data"; anything else
    /// is an error.
    pub fn read(path: &Path, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
                Self::NoData(format!("{}: {source}", path.display()))
            }
            _ => Self::Read {
                path: path.to_owned(),
                source,
            },
        }
    }

    /// Parsing `path` failed with `source`.
    pub fn parse(path: &Path, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        }
    }

    /// Whether this is the quiet "no data" case.
    pub fn is_no_data(&self) -> bool {
        matches!(self, Self::NoData(_))
    }
}

/// A sample that can encode itself as OpenMetrics families.
pub trait EncodeSample: fmt::Debug + Send + Sync + 'static {
    /// Encodes every family of this sample; each family must be complete (contiguous).
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result;

    /// Encodes what stands for a sample that failed or found no data, such as `nvml_up 0`.
    /// Most collectors show nothing then.
    fn encode_missing(_encoder: &mut DescriptorEncoder) -> fmt::Result {
        Ok(())
    }
}

/// One collector: takes a sample when asked. State kept between samples (previous counters
/// for deltas) lives in `self`.
pub trait Collector: Send + 'static {
    /// What one sample produces.
    type Sample: EncodeSample;

    /// Takes one sample at `now` (passed in so tests control time).
    fn sample(
        &mut self,
        now: Instant,
    ) -> impl Future<Output = Result<Self::Sample, CollectorError>> + Send;
}

/// How the last sample went, for `aistack_collector_*`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Status {
    /// Whether the last sample succeeded.
    pub success: bool,
    /// How long the last sample took.
    pub duration: Duration,
    /// Wall-clock time of the last successful sample.
    pub last_success: Option<SystemTime>,
}

/// What a collector's channel holds: the latest sample and how it was taken.
#[derive(Debug)]
pub struct Snapshot<S> {
    /// The latest successful sample; `None` before the first and after a failed one, so stale
    /// values are never served as current.
    pub sample: Option<Arc<S>>,
    /// `None` until the collector ran once.
    pub status: Option<Status>,
}

impl<S> Default for Snapshot<S> {
    fn default() -> Self {
        Self {
            sample: None,
            status: None,
        }
    }
}

/// The receiving end of a collector's channel.
pub type Latest<S> = watch::Receiver<Snapshot<S>>;

/// Creates the channel a collector publishes on.
pub fn channel<S>() -> (watch::Sender<Snapshot<S>>, Latest<S>) {
    watch::channel(Snapshot::default())
}

/// When and how long a collector samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Time between the starts of two samples.
    pub interval: Duration,
    /// Longest a sample may take before it counts as failed.
    pub timeout: Duration,
}

/// Samples `collector` every `schedule.interval` in a background task and publishes on `tx`.
///
/// A sample that outlasts `schedule.timeout` is published as failed at once; the runner then
/// waits for it to finish (and drops its late result) before the next one. Two samples of one
/// collector never overlap, so a read stuck in a driver holds one blocking thread, not one more
/// per interval.
pub fn spawn<C: Collector>(
    kind: CollectorKind,
    mut collector: C,
    schedule: Schedule,
    tx: watch::Sender<Snapshot<C::Sample>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(schedule.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut log = FailureLog::default();
        loop {
            ticker.tick().await;
            let started = Instant::now();
            let mut sampled =
                std::pin::pin!(AssertUnwindSafe(collector.sample(started)).catch_unwind());
            let result = match tokio::time::timeout(schedule.timeout, &mut sampled).await {
                Ok(Ok(result)) => result,
                Ok(Err(panic)) => Err(CollectorError::Panicked(panic_message(&*panic))),
                Err(_) => {
                    let timed_out = Err(CollectorError::TimedOut(schedule.timeout));
                    log.record(kind, &timed_out);
                    publish(&tx, timed_out, started.elapsed());
                    let _late = sampled.await;
                    tracing::debug!(collector = %kind, took = ?started.elapsed(), "late sample finished and was dropped");
                    continue;
                }
            };
            log.record(kind, &result);
            publish(&tx, result, started.elapsed());
        }
    })
}

fn publish<S>(
    tx: &watch::Sender<Snapshot<S>>,
    result: Result<S, CollectorError>,
    duration: Duration,
) {
    tx.send_modify(|snapshot| {
        let last_success = snapshot.status.and_then(|s| s.last_success);
        let (sample, success, last_success) = match result {
            Ok(sample) => (Some(Arc::new(sample)), true, Some(SystemTime::now())),
            Err(_) => (None, false, last_success),
        };
        snapshot.sample = sample;
        snapshot.status = Some(Status {
            success,
            duration,
            last_success,
        });
    });
}

/// What procfs-core needs to know about this host to parse /proc text: the byte order (for
/// socket addresses). Clock ticks and page size cancel out in what the collectors compute.
pub fn system_info() -> procfs_core::ExplicitSystemInfo {
    procfs_core::ExplicitSystemInfo {
        boot_time_secs: 0,
        ticks_per_second: 100,
        page_size: 4096,
        is_little_endian: cfg!(target_endian = "little"),
    }
}

/// Runs blocking file I/O on the blocking pool, so a slow sysfs driver never stalls the
/// runtime's workers; the caller's timeout still applies.
pub async fn blocking<T, F>(read: F) -> Result<T, CollectorError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, CollectorError> + Send + 'static,
{
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|err| match err.try_into_panic() {
            Ok(panic) => CollectorError::Panicked(panic_message(&*panic)),
            Err(err) => CollectorError::Panicked(err.to_string()),
        })?
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// Logs failures without a storm: "no data" at debug; an error at warn when it first appears
/// or changes, at debug while it repeats; recovery at info.
#[derive(Debug, Default)]
struct FailureLog {
    last_error: Option<String>,
}

impl FailureLog {
    fn record<T>(&mut self, kind: CollectorKind, result: &Result<T, CollectorError>) {
        match result {
            Ok(_) => {
                if self.last_error.take().is_some() {
                    tracing::info!(collector = %kind, "collector recovered");
                }
            }
            Err(err) if err.is_no_data() => {
                tracing::debug!(collector = %kind, reason = %err, "collector returned no data");
            }
            Err(err) => {
                let message = err.to_string();
                if self.last_error.as_deref() == Some(message.as_str()) {
                    tracing::debug!(collector = %kind, error = %message, "collector still failing");
                } else {
                    tracing::warn!(collector = %kind, error = %message, "collector failed");
                    self.last_error = Some(message);
                }
            }
        }
    }
}

/// A sample as the classic text format encodes it, with the `aistack` prefix (for tests).
#[cfg(test)]
pub fn encode_text<S: EncodeSample>(sample: S) -> String {
    #[derive(Debug)]
    struct One<S>(S);
    impl<S: EncodeSample> prometheus_client::collector::Collector for One<S> {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            self.0.encode(&mut encoder)
        }
    }
    let mut registry = prometheus_client::registry::Registry::with_prefix("aistack");
    registry.register_collector(Box::new(One(sample)));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Count(u32);

    impl EncodeSample for Count {
        fn encode(&self, _: &mut DescriptorEncoder) -> fmt::Result {
            Ok(())
        }
    }

    /// Succeeds, then finds no data, then outlasts its timeout, then panics, then succeeds.
    struct Scripted {
        calls: u32,
        started: Vec<Instant>,
    }

    impl Collector for Scripted {
        type Sample = Count;

        async fn sample(&mut self, now: Instant) -> Result<Count, CollectorError> {
            self.calls += 1;
            self.started.push(now);
            match self.calls {
                2 => Err(CollectorError::NoData("gone".into())),
                3 => {
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    Ok(Count(3))
                }
                4 => panic!("bug in sample {}", self.calls),
                n => Ok(Count(n)),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn runner_publishes_samples_and_survives_failures_hangs_and_panics() {
        let (tx, mut rx) = channel();
        let schedule = Schedule {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(200),
        };
        let scripted = Scripted {
            calls: 0,
            started: Vec::new(),
        };
        let task = spawn(CollectorKind::Cpu, scripted, schedule, tx);
        let t0 = tokio::time::Instant::now();

        let mut seen = Vec::new();
        let mut published_at = Vec::new();
        for _ in 0..5 {
            rx.changed().await.unwrap();
            published_at.push(t0.elapsed().as_millis());
            let snap = rx.borrow_and_update();
            let status = snap.status.unwrap();
            seen.push((
                snap.sample.as_ref().map(|s| s.0),
                status.success,
                status.last_success.is_some(),
            ));
        }
        task.abort();
        assert_eq!(
            seen,
            [
                (Some(1), true, true),
                (None, false, true), // no data: the old sample is not served as current
                (None, false, true), // timed out: published at the timeout, late result dropped
                (None, false, true), // panicked
                (Some(5), true, true),
            ]
        );
        // The slow third sample (started at 2 s) is reported failed at its 200 ms timeout; the
        // fourth does not overlap it: it starts when the third finishes (4.5 s), and the ticks
        // go on from there.
        assert_eq!(published_at, [0, 1000, 2200, 4500, 5500]);
    }

    #[test]
    fn missing_and_forbidden_files_are_no_data() {
        let path = Path::new("/sys/x");
        for kind in [io::ErrorKind::NotFound, io::ErrorKind::PermissionDenied] {
            assert!(CollectorError::read(path, io::Error::from(kind)).is_no_data());
        }
        assert!(
            !CollectorError::read(path, io::Error::from(io::ErrorKind::InvalidData)).is_no_data()
        );
    }
}
