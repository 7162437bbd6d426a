//! The real [`GpuSource`]: NVML through nvml-wrapper, loaded at run time with `dlopen`, so the
//! exporter starts on hosts without the NVIDIA driver.
//!
//! Per-field calls that fail are `None` (NOT_SUPPORTED quietly; anything else logged at debug);
//! a device whose handle or identity cannot be read, or that reports GPU_IS_LOST to any call, is
//! left out of the reading (the collector shows it as `gpu_up 0`). Errors meaning the library
//! itself is gone (uninitialised, driver not loaded, library/driver version mismatch) fail the
//! whole read, so the collector re-initialises.
//!
//! Hot-plug: NVML enumerates GPUs when it initialises, so a GPU that comes back (an eGPU
//! plugged in again, a GPU recovered by a reset) is only seen after a new `nvmlInit`. While a
//! GPU seen before is missing or lost, the source re-initialises every 5 s, then less often,
//! up to every 60 s. A re-initialisation takes two reads: the first asks the XID thread to end
//! and reads on with the old handle; a later one, once the thread let go, shuts NVML down and
//! initialises it again. No read waits for the thread; a reset after NVML failed as a whole
//! waits for it up to 2 s.
//!
//! XID errors arrive through an NVML event set, on a thread of their own ([`XidWatcher`])
//! that shares the source's library handle and is started and stopped with it: it never
//! holds up a read or a scrape.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::{Device, Nvml};

use super::health::XidLog;
use super::{
    ClockReadings, DeviceReading, EccReading, GpuError, GpuReading, GpuSource, PcieReading,
    ProcessKind, ProcessReading, RemappedRowsReading, RetiredPagesReading,
};

/// NVML, initialised on first use.
pub struct NvmlSource {
    library: String,
    nvml: Option<Arc<Nvml>>,
    /// Every GPU UUID read since start, to notice one missing.
    seen: BTreeSet<String>,
    /// When to re-initialise to look for a missing GPU again, and the delay after that.
    rescan: Option<(Instant, Duration)>,
    /// A re-initialisation was asked for and waits for the XID thread to end.
    reinit: bool,
    xids: Option<Arc<XidLog>>,
    watcher: Option<XidWatcher>,
    /// When the XID thread may be started again, and the wait after that: a thread that ends
    /// at once (no GPU supports the event, the set keeps failing) is not restarted every read.
    next_watch: Option<(Instant, Duration)>,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource")
            .field("library", &self.library)
            .field("initialised", &self.nvml.is_some())
            .field("rescan", &self.rescan)
            .finish_non_exhaustive()
    }
}

impl Drop for NvmlSource {
    fn drop(&mut self) {
        self.release();
    }
}

impl NvmlSource {
    /// Loads `library` (a file name for the usual search, or a path) on the first read.
    pub fn new(library: impl Into<String>) -> Self {
        Self {
            library: library.into(),
            nvml: None,
            seen: BTreeSet::new(),
            rescan: None,
            reinit: false,
            xids: None,
            watcher: None,
            next_watch: None,
        }
    }

    const RESCAN_FIRST: Duration = Duration::from_secs(5);
    const RESCAN_MAX: Duration = Duration::from_secs(60);
    const WATCH_RETRY_FIRST: Duration = Duration::from_secs(5);
    const WATCH_RETRY_MAX: Duration = Duration::from_secs(60);
    /// How long a re-initialisation waits for the XID thread before leaving it behind.
    const WATCHER_PATIENCE: Duration = Duration::from_millis(XID_WAIT_MS as u64 * 4);

    /// After a read that found `present` and `lost` devices: schedule a re-initialisation
    /// while a GPU seen before is missing, or a device is lost.
    fn note_devices(&mut self, now: Instant, present: &BTreeSet<String>, lost: usize) {
        self.seen.extend(present.iter().cloned());
        let missing = lost > 0 || self.seen.len() > present.len();
        self.rescan = match (missing, self.rescan) {
            (false, _) => None,
            (true, None) => Some((now + Self::RESCAN_FIRST, Self::RESCAN_FIRST)),
            (true, pending) => pending,
        };
    }

    /// Whether a scheduled re-initialisation is due; schedules the next one.
    fn rescan_due(&mut self, now: Instant) -> bool {
        match self.rescan {
            Some((at, delay)) if now >= at => {
                let next = (delay * 2).min(Self::RESCAN_MAX);
                self.rescan = Some((now + next, next));
                true
            }
            _ => false,
        }
    }

    /// Whether the XID thread should be started now (none running, no re-initialisation under
    /// way, and not before its retry time); schedules the retry after this start.
    fn watch_due(&mut self, now: Instant) -> bool {
        if self.xids.is_none()
            || self.reinit
            || !self.watcher.as_ref().is_none_or(XidWatcher::ended)
        {
            return false;
        }
        let lived = self.watcher.as_ref().and_then(XidWatcher::lifetime);
        self.watch_due_after(now, lived)
    }

    /// [`NvmlSource::watch_due`] once the last thread (if any) ended after living `lived`.
    fn watch_due_after(&mut self, now: Instant, lived: Option<Duration>) -> bool {
        let delay = match self.next_watch {
            Some((at, _)) if now < at => return false,
            // One that lived past its retry delay ended for a reason of its own (a GPU lost),
            // not for want of anything to watch: the first delay again.
            Some((_, delay)) if lived.is_none_or(|l| l < delay) => {
                (delay * 2).min(Self::WATCH_RETRY_MAX)
            }
            _ => Self::WATCH_RETRY_FIRST,
        };
        self.next_watch = Some((now + delay, delay));
        true
    }

    /// Stops the XID watcher and drops the library handle (the last user's drop shuts NVML
    /// down).
    fn release(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.stop(Self::WATCHER_PATIENCE);
        }
        // A new handle gets its watcher at once.
        self.next_watch = None;
        self.reinit = false;
        if let Some(nvml) = self.nvml.take() {
            match Arc::try_unwrap(nvml) {
                Ok(nvml) => {
                    if let Err(err) = nvml.shutdown() {
                        tracing::debug!(collector = "gpu", error = %err, "nvmlShutdown failed");
                    }
                }
                // A watcher stuck in the driver still holds it; it shuts NVML down when it ends.
                Err(_) => tracing::debug!(collector = "gpu", "NVML still held by the XID watcher"),
            }
        }
    }
}

/// Whether an error means NVML as a whole is gone, not just one call or one device.
fn is_fatal(err: &NvmlError) -> bool {
    matches!(
        err,
        NvmlError::Uninitialized
            | NvmlError::DriverNotLoaded
            | NvmlError::LibRmVersionMismatch
            | NvmlError::LibloadingError(_)
    )
}

fn unavailable(err: NvmlError) -> GpuError {
    GpuError::Unavailable(err.to_string())
}

/// `Some(value)`, or `None` with a debug line for anything but NOT_SUPPORTED. A fatal error is
/// kept so the read can fail as a whole.
/// GPU_IS_LOST from any call marks the device lost.
struct Fields<'a> {
    index: u32,
    fatal: &'a mut Option<NvmlError>,
    lost: bool,
}

impl Fields<'_> {
    fn get<T>(&mut self, field: &str, result: Result<T, NvmlError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(NvmlError::NotSupported) => None,
            Err(NvmlError::GpuLost) => {
                self.lost = true;
                None
            }
            Err(err) if is_fatal(&err) => {
                self.fatal.get_or_insert(err);
                None
            }
            Err(err) => {
                tracing::debug!(collector = "gpu", gpu = self.index, field, error = %err, "field unavailable");
                None
            }
        }
    }
}

fn processes(kind: ProcessKind, list: Vec<ProcessInfo>) -> impl Iterator<Item = ProcessReading> {
    list.into_iter().map(move |p| ProcessReading {
        pid: p.pid,
        kind,
        used_memory_bytes: match p.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(bytes),
            UsedGpuMemory::Unavailable => None,
        },
    })
}

fn read_device(
    index: u32,
    device: &Device<'_>,
    fatal: &mut Option<NvmlError>,
) -> Option<DeviceReading> {
    // Without its identity a device cannot be labelled: leave it out.
    let name = device
        .name()
        .map_err(|e| fatal_or_skip(index, "name", e, fatal))
        .ok()?;
    let uuid = device
        .uuid()
        .map_err(|e| fatal_or_skip(index, "uuid", e, fatal))
        .ok()?;
    let mut f = Fields {
        index,
        fatal,
        lost: false,
    };
    let memory = f.get("memory_info", device.memory_info());
    let utilization = f.get("utilization", device.utilization_rates());
    let fields = HealthFields::read(&mut f, device);
    // Lost: every further call would answer the same, each after the driver's own wait.
    if f.lost || fields.lost {
        tracing::debug!(collector = "gpu", gpu = index, %uuid, "GPU is lost: left out");
        return None;
    }
    let fans = f.get("num_fans", device.num_fans()).unwrap_or(0);
    let fan_speeds_percent = (0..fans)
        .filter_map(|fan| f.get("fan_speed", device.fan_speed(fan)))
        .collect();
    let mut process_list: Vec<ProcessReading> = Vec::new();
    if let Some(list) = f.get("compute_processes", device.running_compute_processes()) {
        process_list.extend(processes(ProcessKind::Compute, list));
    }
    if let Some(list) = f.get("graphics_processes", device.running_graphics_processes()) {
        process_list.extend(processes(ProcessKind::Graphics, list));
    }
    let pci_bus_id = f.get("pci_info", device.pci_info()).map(|p| p.bus_id);
    let temperature_gpu_celsius = f.get("temperature", device.temperature(TemperatureSensor::Gpu));
    let power_usage_milliwatts = f.get("power_usage", device.power_usage());
    let enforced_power_limit_milliwatts = f.get("power_limit", device.enforced_power_limit());
    let total_energy_millijoules = f.get("total_energy", device.total_energy_consumption());
    let clocks_mhz = ClockReadings {
        graphics: f.get("clock_graphics", device.clock_info(Clock::Graphics)),
        sm: f.get("clock_sm", device.clock_info(Clock::SM)),
        memory: f.get("clock_memory", device.clock_info(Clock::Memory)),
    };
    let clocks_event_reasons = f
        .get("clocks_event_reasons", device.current_throttle_reasons())
        .map(|r| r.bits());
    let encoder_utilization_percent = f
        .get("encoder_utilization", device.encoder_utilization())
        .map(|u| u.utilization);
    let decoder_utilization_percent = f
        .get("decoder_utilization", device.decoder_utilization())
        .map(|u| u.utilization);
    let pcie = PcieReading {
        link_gen_current: f.get("pcie_gen", device.current_pcie_link_gen()),
        link_gen_max: f.get("pcie_gen_max", device.max_pcie_link_gen()),
        link_width_current: f.get("pcie_width", device.current_pcie_link_width()),
        link_width_max: f.get("pcie_width_max", device.max_pcie_link_width()),
        replay_counter: fields.u64(PCIE_REPLAY_COUNTER),
    };
    if f.lost || fields.lost {
        tracing::debug!(collector = "gpu", gpu = index, %uuid, "GPU is lost: left out");
        return None;
    }
    Some(DeviceReading {
        index,
        name,
        uuid,
        pci_bus_id,
        utilization_gpu_percent: utilization.as_ref().map(|u| u.gpu),
        memory_used_bytes: memory.as_ref().map(|m| m.used),
        memory_total_bytes: memory.as_ref().map(|m| m.total),
        memory_free_bytes: memory.as_ref().map(|m| m.free),
        temperature_gpu_celsius,
        power_usage_milliwatts,
        enforced_power_limit_milliwatts,
        total_energy_millijoules,
        clocks_mhz,
        fan_speeds_percent,
        clocks_event_reasons,
        processes: process_list,
        utilization_memory_percent: utilization.as_ref().map(|u| u.memory),
        encoder_utilization_percent,
        decoder_utilization_percent,
        // GDDR parts without a memory sensor answer 0 rather than NOT_SUPPORTED.
        memory_temperature_celsius: fields.u32(MEMORY_TEMP).filter(|&t| t > 0),
        pcie,
        ecc: EccReading {
            corrected_volatile: fields.u64(ECC_SBE_VOL_TOTAL),
            uncorrected_volatile: fields.u64(ECC_DBE_VOL_TOTAL),
            corrected_aggregate: fields.u64(ECC_SBE_AGG_TOTAL),
            uncorrected_aggregate: fields.u64(ECC_DBE_AGG_TOTAL),
        },
        retired_pages: RetiredPagesReading {
            single_bit: fields.u64(RETIRED_SBE),
            double_bit: fields.u64(RETIRED_DBE),
            pending: fields.flag(RETIRED_PENDING),
        },
        remapped_rows: RemappedRowsReading {
            correctable: fields.u64(REMAPPED_COR),
            uncorrectable: fields.u64(REMAPPED_UNC),
            pending: fields.flag(REMAPPED_PENDING),
            failure: fields.flag(REMAPPED_FAILURE),
        },
    })
}

// NVML field ids (nvml.h `NVML_FI_DEV_*`), read in one nvmlDeviceGetFieldValues call.
const ECC_SBE_VOL_TOTAL: u32 = 3;
const ECC_DBE_VOL_TOTAL: u32 = 4;
const ECC_SBE_AGG_TOTAL: u32 = 5;
const ECC_DBE_AGG_TOTAL: u32 = 6;
const RETIRED_SBE: u32 = 29;
const RETIRED_DBE: u32 = 30;
const RETIRED_PENDING: u32 = 31;
const MEMORY_TEMP: u32 = 82;
const PCIE_REPLAY_COUNTER: u32 = 94;
const REMAPPED_COR: u32 = 142;
const REMAPPED_UNC: u32 = 143;
const REMAPPED_PENDING: u32 = 144;
const REMAPPED_FAILURE: u32 = 145;

const HEALTH_FIELDS: [u32; 13] = [
    ECC_SBE_VOL_TOTAL,
    ECC_DBE_VOL_TOTAL,
    ECC_SBE_AGG_TOTAL,
    ECC_DBE_AGG_TOTAL,
    RETIRED_SBE,
    RETIRED_DBE,
    RETIRED_PENDING,
    MEMORY_TEMP,
    PCIE_REPLAY_COUNTER,
    REMAPPED_COR,
    REMAPPED_UNC,
    REMAPPED_PENDING,
    REMAPPED_FAILURE,
];

/// The health fields of one device, from one field-values call; a field the device does
/// not support (most of them on consumer cards) is absent.
struct HealthFields {
    values: Vec<(u32, SampleValue)>,
    /// A field answered GPU_IS_LOST.
    lost: bool,
}

impl HealthFields {
    fn read(f: &mut Fields<'_>, device: &Device<'_>) -> Self {
        let ids = HEALTH_FIELDS.map(FieldId);
        let values = f
            .get("field_values", device.field_values_for(&ids))
            .unwrap_or_default();
        let mut lost = false;
        // In request order: the answer's own field id may be the driver's renumbering.
        let values = HEALTH_FIELDS
            .iter()
            .zip(values)
            .filter_map(|(&id, sample)| match sample.map(|s| s.value) {
                Ok(Ok(value)) => Some((id, value)),
                Ok(Err(err)) | Err(err) => {
                    match err {
                        NvmlError::NotSupported => {}
                        NvmlError::GpuLost => lost = true,
                        err => {
                            tracing::debug!(collector = "gpu", gpu = f.index, field = id, error = %err, "field unavailable");
                        }
                    }
                    None
                }
            })
            .collect();
        Self { values, lost }
    }

    fn u64(&self, id: u32) -> Option<u64> {
        let value = self.values.iter().find(|(i, _)| *i == id)?;
        match value.1 {
            SampleValue::U32(v) => Some(u64::from(v)),
            SampleValue::U64(v) => Some(v),
            SampleValue::I64(v) => u64::try_from(v).ok(),
            SampleValue::F64(v) => (v.is_finite() && v >= 0.0).then_some(v as u64),
        }
    }

    fn u32(&self, id: u32) -> Option<u32> {
        self.u64(id).and_then(|v| u32::try_from(v).ok())
    }

    fn flag(&self, id: u32) -> Option<bool> {
        self.u64(id).map(|v| v != 0)
    }
}

fn fatal_or_skip(index: u32, field: &str, err: NvmlError, fatal: &mut Option<NvmlError>) {
    if is_fatal(&err) {
        fatal.get_or_insert(err);
    } else {
        tracing::debug!(collector = "gpu", gpu = index, field, error = %err, "device left out");
    }
}

impl GpuSource for NvmlSource {
    fn read(&mut self) -> Result<GpuReading, GpuError> {
        let now = Instant::now();
        if self.nvml.is_some() && self.rescan_due(now) {
            tracing::debug!(
                collector = "gpu",
                "a GPU seen before is missing: re-initialising NVML to look for it"
            );
            self.reinit = true;
            if let Some(watcher) = &self.watcher {
                watcher.ask_to_stop(now);
            }
        }
        if self.reinit
            && self
                .watcher
                .as_ref()
                .is_none_or(|w| w.ended() || w.stopping_for(now) >= Self::WATCHER_PATIENCE)
        {
            self.release();
        }
        let nvml = match self.nvml.take() {
            Some(nvml) => nvml,
            None => {
                let nvml = Nvml::builder()
                    .lib_path(OsStr::new(&self.library))
                    .init()
                    .map_err(unavailable)?;
                Arc::new(nvml)
            }
        };
        let nvml = self.nvml.insert(nvml).clone();
        let count = nvml.device_count().map_err(unavailable)?;
        let mut fatal = None;
        let mut lost = 0;
        let mut devices = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = match nvml.device_by_index(index) {
                Ok(device) => read_device(index, &device, &mut fatal),
                Err(err) => {
                    fatal_or_skip(index, "handle", err, &mut fatal);
                    None
                }
            };
            match device {
                Some(device) => devices.push(device),
                None => lost += 1,
            }
        }
        let mut f = Fields {
            index: u32::MAX,
            fatal: &mut fatal,
            lost: false,
        };
        let driver_version = f.get("driver_version", nvml.sys_driver_version());
        let cuda_driver_version = f.get("cuda_version", nvml.sys_cuda_driver_version());
        if let Some(err) = fatal {
            return Err(unavailable(err));
        }
        let present: BTreeSet<String> = devices.iter().map(|d| d.uuid.clone()).collect();
        self.note_devices(now, &present, lost);
        if self.watch_due(now)
            && let Some(log) = &self.xids
        {
            self.watcher = Some(XidWatcher::start(nvml, log.clone(), &present));
        }
        Ok(GpuReading {
            driver_version,
            cuda_driver_version,
            devices,
        })
    }

    fn reset(&mut self) {
        self.release();
    }

    fn watch_xids(&mut self, log: Arc<XidLog>) {
        self.xids = Some(log);
    }

    fn remember(&mut self, uuids: &[String]) {
        self.seen.extend(uuids.iter().cloned());
    }
}

/// How long one event wait lasts: the most a stop waits for the thread.
const XID_WAIT_MS: u32 = 500;

/// The thread that waits for XID errors on an NVML event set holding every GPU that supports
/// them, and counts each in the [`XidLog`]. It ends when told to, when the set fails (a GPU
/// lost, the driver gone) — the source starts a new one with its next handle — or when the
/// library goes away.
#[derive(Debug)]
pub struct XidWatcher {
    stop: Arc<AtomicBool>,
    /// When it was asked to stop.
    stopping_since: std::sync::OnceLock<Instant>,
    /// Gets the time the thread ended, once it has dropped its library handle (disconnected
    /// if it never ran).
    done: mpsc::Receiver<Instant>,
    started: Instant,
    ended_at: std::sync::OnceLock<Instant>,
}

impl XidWatcher {
    /// Registers the GPUs with UUIDs in `gpus` for XID events and starts waiting.
    pub fn start(nvml: Arc<Nvml>, log: Arc<XidLog>, gpus: &BTreeSet<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, done) = mpsc::channel();
        let gpus = gpus.clone();
        let stop_in = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("xid-events".into())
            .spawn(move || {
                watch(&nvml, &log, &gpus, &stop_in);
                // The handle goes first: whoever sees "ended" may shut NVML down.
                drop(nvml);
                let _ = tx.send(Instant::now());
            });
        if let Err(err) = spawned {
            tracing::warn!(collector = "gpu", error = %err, "cannot start the XID event thread");
        }
        Self {
            stop,
            stopping_since: std::sync::OnceLock::new(),
            done,
            started: Instant::now(),
            ended_at: std::sync::OnceLock::new(),
        }
    }

    /// Whether the thread has ended (on its own or told to) and let go of the library.
    pub fn ended(&self) -> bool {
        if self.ended_at.get().is_some() {
            return true;
        }
        match self.done.try_recv() {
            Ok(at) => {
                let _ = self.ended_at.set(at);
                true
            }
            Err(mpsc::TryRecvError::Empty) => false,
            // It never ran.
            Err(mpsc::TryRecvError::Disconnected) => {
                let _ = self.ended_at.set(self.started);
                true
            }
        }
    }

    /// How long it ran, once it has ended.
    pub fn lifetime(&self) -> Option<Duration> {
        if !self.ended() {
            return None;
        }
        self.ended_at
            .get()
            .map(|end| end.saturating_duration_since(self.started))
    }

    /// Tells the thread to end after its current wait, without waiting for it.
    pub fn ask_to_stop(&self, now: Instant) {
        self.stop.store(true, Ordering::Release);
        self.stopping_since.get_or_init(|| now);
    }

    /// How long ago it was asked to stop (zero if it was not).
    pub fn stopping_for(&self, now: Instant) -> Duration {
        self.stopping_since.get().map_or(Duration::ZERO, |since| {
            now.saturating_duration_since(*since)
        })
    }

    /// Tells the thread to end and waits up to `patience` for it (it checks between waits),
    /// so the library handle it holds is released before NVML is shut down and initialised
    /// again.
    pub fn stop(self, patience: Duration) {
        self.ask_to_stop(Instant::now());
        let patience = patience.saturating_sub(self.stopping_for(Instant::now()));
        if self.ended_at.get().is_none()
            && let Err(mpsc::RecvTimeoutError::Timeout) = self.done.recv_timeout(patience)
        {
            tracing::warn!(
                collector = "gpu",
                "the XID event thread is stuck in the driver; leaving it"
            );
        }
    }
}

fn watch(nvml: &Nvml, log: &XidLog, gpus: &BTreeSet<String>, stop: &AtomicBool) {
    let Some((set, watched)) = register(nvml, gpus) else {
        return;
    };
    for (_, uuid) in &watched {
        log.watching(uuid);
    }
    tracing::debug!(
        collector = "gpu",
        gpus = watched.len(),
        "watching for XID errors"
    );
    while !stop.load(Ordering::Acquire) {
        match set.wait(XID_WAIT_MS) {
            Ok(event) => {
                // NVML's 999 ("unknown") counts as itself, as dcgm-exporter shows it.
                let xid = match event.event_data {
                    Some(XidError::Value(xid)) => xid,
                    Some(XidError::Unknown) => 999,
                    None => continue,
                };
                for uuid in event_gpus(&event.device, &watched) {
                    let count = log.record(uuid, xid);
                    // A storm logs at 1, 2, 4, 8, ... of each XID, not every event.
                    if count.is_power_of_two() {
                        tracing::warn!(collector = "gpu", %uuid, xid, count, "XID error");
                    }
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(err) => {
                tracing::debug!(collector = "gpu", error = %err, "XID event wait failed; the next read starts a new watch");
                return;
            }
        }
    }
}

/// The watched GPU an event came from. A GPU that fell off the bus no longer tells its UUID
/// (GPU_IS_LOST): the event is then the watched GPU(s) that no longer answer — never a healthy
/// one, so an unplugged eGPU's XID 79 does not mark the GPU beside it lost. `device`'s raw
/// handle would say it directly, but nvml-wrapper hands it out only through `unsafe`.
fn event_gpus<'w>(device: &Device<'_>, watched: &'w [(Device<'_>, String)]) -> Vec<&'w str> {
    if let Ok(uuid) = device.uuid() {
        if let Some((_, uuid)) = watched.iter().find(|(_, w)| *w == uuid) {
            return vec![uuid.as_str()];
        }
        tracing::warn!(collector = "gpu", %uuid, "XID error from a GPU that is not watched: not counted");
        return Vec::new();
    }
    let silent: Vec<&str> = watched
        .iter()
        .filter(|(d, _)| d.uuid().is_err())
        .map(|(_, uuid)| uuid.as_str())
        .collect();
    if silent.is_empty() {
        tracing::warn!(
            collector = "gpu",
            "XID error from a GPU that is not watched: not counted"
        );
    }
    silent
}

/// An event set with every GPU in `gpus` that supports XID events, and their UUIDs; `None`
/// when none does or the set cannot be made. A registration that fails frees the whole set
/// (NVML's rule), so support is checked first.
#[allow(clippy::type_complexity)]
fn register<'n>(
    nvml: &'n Nvml,
    gpus: &BTreeSet<String>,
) -> Option<(nvml_wrapper::EventSet<'n>, Vec<(Device<'n>, String)>)> {
    let count = nvml.device_count().ok()?;
    let mut set = None;
    let mut watched = Vec::new();
    for index in 0..count {
        let Ok(device) = nvml.device_by_index(index) else {
            continue;
        };
        let Ok(uuid) = device.uuid() else {
            continue;
        };
        let supported = device
            .supported_event_types()
            .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
        if !gpus.contains(&uuid) || !supported {
            continue;
        }
        let current = match set.take() {
            Some(set) => set,
            None => match nvml.create_event_set() {
                Ok(set) => set,
                Err(err) => {
                    tracing::debug!(collector = "gpu", error = %err, "cannot create an NVML event set");
                    return None;
                }
            },
        };
        match device.register_events(EventTypes::CRITICAL_XID_ERROR, current) {
            Ok(registered) => {
                set = Some(registered);
                watched.push((device, uuid));
            }
            Err(err) => {
                // The set is gone with the failure: start over without this GPU.
                tracing::debug!(collector = "gpu", %uuid, error = %err.error, "XID events unavailable");
                let rest: BTreeSet<String> = gpus.iter().filter(|g| **g != uuid).cloned().collect();
                return register(nvml, &rest);
            }
        }
    }
    Some((set?, watched))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuids(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|u| (*u).to_owned()).collect()
    }

    #[test]
    fn a_missing_gpu_schedules_re_initialisations_that_back_off_and_stop_when_it_is_back() {
        let mut source = NvmlSource::new("libnvidia-ml.so.1");
        let start = Instant::now();
        source.note_devices(start, &uuids(&["GPU-a", "GPU-b"]), 0);
        assert!(source.rescan.is_none(), "all there: no re-initialisation");

        // GPU-b is gone: first rescan after 5 s, then 10, 20, 40, 60, 60.
        source.note_devices(start, &uuids(&["GPU-a"]), 0);
        let mut now = start;
        let mut delays = Vec::new();
        for _ in 0..6 {
            let (at, _) = source.rescan.unwrap();
            assert!(!source.rescan_due(at - Duration::from_millis(1)));
            delays.push(at - now);
            now = at;
            assert!(source.rescan_due(now));
            source.note_devices(now, &uuids(&["GPU-a"]), 0);
        }
        let secs: Vec<u64> = delays.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [5, 10, 20, 40, 60, 60]);

        // A lost handle counts as missing too, even with every UUID known present.
        source.note_devices(now, &uuids(&["GPU-a", "GPU-b"]), 0);
        assert!(source.rescan.is_none(), "back: no more re-initialisations");
        source.note_devices(now, &uuids(&["GPU-a", "GPU-b"]), 1);
        assert_eq!(source.rescan.unwrap().1, NvmlSource::RESCAN_FIRST);
    }

    #[test]
    fn an_xid_thread_that_keeps_ending_is_restarted_less_and_less_often() {
        let mut source = NvmlSource::new("libnvidia-ml.so.1");
        let start = Instant::now();
        assert!(!source.watch_due(start), "no XID log: never");
        source.xids = Some(Arc::default());
        assert!(source.watch_due(start), "the first start is at once");
        // It ends at once each time (nothing to watch): 5, 10, 20, 40, 60, 60 s apart, however
        // seldom reads come (the lifetime is the thread's own, not when a read noticed).
        let mut now = start;
        let mut gaps = Vec::new();
        for _ in 0..6 {
            let mut next = now + Duration::from_secs(1);
            while !source.watch_due_after(next, Some(Duration::from_millis(1))) {
                next += Duration::from_secs(1);
            }
            gaps.push((next - now).as_secs());
            now = next;
        }
        assert_eq!(gaps, [5, 10, 20, 40, 60, 60]);

        // One that ran long before ending is restarted after the first delay again.
        let later = now + Duration::from_secs(600);
        assert!(source.watch_due_after(later, Some(Duration::from_secs(540))));
        assert_eq!(source.next_watch.unwrap().1, NvmlSource::WATCH_RETRY_FIRST);

        // While a re-initialisation waits for the thread, none is started.
        source.reinit = true;
        assert!(!source.watch_due(later + Duration::from_secs(3600)));
    }
}
