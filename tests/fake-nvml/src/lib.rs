//! A stand-in for `libnvidia-ml.so.1`, for tests on machines without an NVIDIA GPU.
//!
//! It exports the NVML C functions aistack-exporter calls (through nvml-wrapper) and answers
//! them from a JSON scenario named by `FAKE_NVML_SCENARIO`, in the recorded-GPU fixture format
//! (`tests/fixtures/gpu/*.json`): a field that is `null` answers `NVML_ERROR_NOT_SUPPORTED`.
//! Knobs on top:
//!
//! - `"gone": true` — the driver is not loaded: `nvmlInit_v2` and `nvmlDeviceGetCount_v2`
//!   answer `NVML_ERROR_DRIVER_NOT_LOADED` (a driver reload, an unplugged eGPU).
//! - a device's `"lost": true` — its calls answer `NVML_ERROR_GPU_IS_LOST` (an eGPU unplugged
//!   from under a running driver, a GPU fallen off the bus); removing it from `devices` is the
//!   device count dropping. `"lost_calls": ["nvmlDeviceGetMemoryInfo_v2", ...]` makes only those
//!   calls answer it (the reference allows GPU_IS_LOST from any device call; a driver may still
//!   answer a GPU's name and UUID from what it enumerated).
//! - a device's `"xids": [79, ...]` — XID critical errors, delivered once each, in order,
//!   through event sets (`nvmlEventSetWait_v2`) the device is registered in; appending to the
//!   list raises new ones. `"xid_events": false` makes the device not support the event.
//!
//! `nvmlInit_v2` and `nvmlShutdown` are reference-counted as in the real library: the state
//! goes only with the last shutdown, so two NVML users in one process (the sampler and the
//! XID event thread) do not pull it from under each other.
//!
//! The scenario is re-read by `nvmlInit_v2` and `nvmlDeviceGetCount_v2`, so a test changes what
//! the "driver" says by rewriting the file; devices added to it are seen only after a new
//! initialisation, as with the real library, which enumerates GPUs when it initialises (one
//! removed is forgotten at once). Every call is counted in `FAKE_NVML_CALLS` when set (one
//! line per call), so tests can see what was asked.
//!
//! This is the one place in the workspace with `unsafe`: a C ABI takes raw out-pointers. Every
//! pointer is checked for null before it is written.

use std::ffi::{c_char, c_int, c_uint, c_ulonglong};
use std::io::Write;
use std::sync::Mutex;

use serde::Deserialize;

type NvmlReturn = c_int;
const SUCCESS: NvmlReturn = 0;
const ERROR_UNINITIALIZED: NvmlReturn = 1;
const ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
const ERROR_NOT_SUPPORTED: NvmlReturn = 3;
const ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
const ERROR_DRIVER_NOT_LOADED: NvmlReturn = 9;
const ERROR_TIMEOUT: NvmlReturn = 10;
const ERROR_GPU_IS_LOST: NvmlReturn = 15;
const ERROR_UNKNOWN: NvmlReturn = 999;

/// Opaque device handle: index + 1 (never null).
type Device = *mut std::ffi::c_void;

#[derive(Debug, Clone, Default, Deserialize)]
struct Scenario {
    #[serde(default)]
    gone: bool,
    driver_version: Option<String>,
    cuda_driver_version: Option<c_int>,
    #[serde(default)]
    devices: Vec<FakeDevice>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct FakeDevice {
    #[serde(default)]
    lost: bool,
    #[serde(default)]
    lost_calls: Vec<String>,
    name: Option<String>,
    uuid: Option<String>,
    pci_bus_id: Option<String>,
    utilization_gpu_percent: Option<c_uint>,
    memory_used_bytes: Option<c_ulonglong>,
    memory_total_bytes: Option<c_ulonglong>,
    temperature_gpu_celsius: Option<c_uint>,
    power_usage_milliwatts: Option<c_uint>,
    enforced_power_limit_milliwatts: Option<c_uint>,
    total_energy_millijoules: Option<c_ulonglong>,
    #[serde(default)]
    clocks_mhz: Clocks,
    fan_speeds_percent: Option<Vec<c_uint>>,
    clocks_event_reasons: Option<c_ulonglong>,
    #[serde(default)]
    processes: Vec<Process>,
    utilization_memory_percent: Option<c_uint>,
    encoder_utilization_percent: Option<c_uint>,
    decoder_utilization_percent: Option<c_uint>,
    memory_temperature_celsius: Option<c_uint>,
    #[serde(default)]
    pcie: Option<Pcie>,
    #[serde(default)]
    ecc: Option<Ecc>,
    #[serde(default)]
    retired_pages: Option<RetiredPages>,
    #[serde(default)]
    remapped_rows: Option<RemappedRows>,
    #[serde(default)]
    xid_events: Option<bool>,
    #[serde(default)]
    xids: Vec<c_ulonglong>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Pcie {
    link_gen_current: Option<c_uint>,
    link_gen_max: Option<c_uint>,
    link_width_current: Option<c_uint>,
    link_width_max: Option<c_uint>,
    replay_counter: Option<c_ulonglong>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Ecc {
    corrected_volatile: Option<c_ulonglong>,
    uncorrected_volatile: Option<c_ulonglong>,
    corrected_aggregate: Option<c_ulonglong>,
    uncorrected_aggregate: Option<c_ulonglong>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct RetiredPages {
    single_bit: Option<c_ulonglong>,
    double_bit: Option<c_ulonglong>,
    pending: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct RemappedRows {
    correctable: Option<c_ulonglong>,
    uncorrectable: Option<c_ulonglong>,
    pending: Option<bool>,
    failure: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Clocks {
    graphics: Option<c_uint>,
    sm: Option<c_uint>,
    memory: Option<c_uint>,
}

#[derive(Debug, Clone, Deserialize)]
struct Process {
    pid: c_uint,
    kind: String,
    used_memory_bytes: Option<c_ulonglong>,
}

/// `None` until `nvmlInit_v2` succeeded, and again after the last `nvmlShutdown`.
static STATE: Mutex<Option<Scenario>> = Mutex::new(None);

/// Successful `nvmlInit_v2` calls not yet matched by an `nvmlShutdown`.
static INITS: Mutex<usize> = Mutex::new(0);

/// The UUIDs the first `nvmlInit_v2` found. As with the real library, a GPU that appears
/// later (an eGPU plugged in) is seen only after every user shut down and one initialised
/// again; one that goes away is gone at once.
static ENUMERATED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// `scenario` as NVML sees it: only devices enumerated at initialisation.
fn visible(mut scenario: Scenario) -> Scenario {
    let enumerated = ENUMERATED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    scenario
        .devices
        .retain(|d| d.uuid.as_ref().is_none_or(|u| enumerated.contains(u)));
    scenario
}

fn record(call: &str) {
    if let Some(path) = std::env::var_os("FAKE_NVML_CALLS")
        && let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(file, "{call}");
    }
}

fn load() -> Scenario {
    std::env::var_os("FAKE_NVML_SCENARIO")
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(Scenario {
            gone: true,
            ..Scenario::default()
        })
}

/// [`load`], parsed again only when the file changed: event waits poll it, and an XID storm
/// scenario is large.
fn load_cached() -> Scenario {
    static CACHE: Mutex<Option<((std::time::SystemTime, u64), Scenario)>> = Mutex::new(None);
    let stamp = std::env::var_os("FAKE_NVML_SCENARIO")
        .and_then(|path| std::fs::metadata(path).ok())
        .and_then(|m| Some((m.modified().ok()?, m.len())));
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match (stamp, cache.as_ref()) {
        (Some(stamp), Some((cached, scenario))) if *cached == stamp => scenario.clone(),
        (Some(stamp), _) => {
            let scenario = load();
            *cache = Some((stamp, scenario.clone()));
            scenario
        }
        (None, _) => load(),
    }
}

/// Runs `f` on the device behind `handle`, mapping "not initialised", "lost" and bad handles.
fn with_device(
    call: &str,
    handle: Device,
    f: impl FnOnce(&FakeDevice) -> NvmlReturn,
) -> NvmlReturn {
    record(call);
    let state = STATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(scenario) = state.as_ref() else {
        return ERROR_UNINITIALIZED;
    };
    if scenario.gone {
        return ERROR_DRIVER_NOT_LOADED;
    }
    let Some(device) = (handle as usize)
        .checked_sub(1)
        .and_then(|i| scenario.devices.get(i))
    else {
        return ERROR_INVALID_ARGUMENT;
    };
    if device.lost || device.lost_calls.iter().any(|c| c == call) {
        return ERROR_GPU_IS_LOST;
    }
    f(device)
}

/// Writes `value` to `out`, or answers NOT_SUPPORTED for `None`.
unsafe fn put<T: Copy>(out: *mut T, value: Option<T>) -> NvmlReturn {
    match value {
        None => ERROR_NOT_SUPPORTED,
        Some(_) if out.is_null() => ERROR_INVALID_ARGUMENT,
        Some(v) => {
            // SAFETY: non-null out-pointer provided by the caller for a T.
            unsafe { out.write(v) };
            SUCCESS
        }
    }
}

/// Copies `text` NUL-terminated into a caller buffer of `len` bytes.
unsafe fn put_str(out: *mut c_char, len: c_uint, text: Option<&str>) -> NvmlReturn {
    let Some(text) = text else {
        return ERROR_NOT_SUPPORTED;
    };
    if out.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let bytes = text.as_bytes();
    if bytes.len() + 1 > len as usize {
        return ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller's buffer holds `len` bytes, checked above.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), out, bytes.len());
        out.add(bytes.len()).write(0);
    }
    SUCCESS
}

/// `nvmlInit_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    record("nvmlInit_v2");
    let scenario = load();
    if scenario.gone {
        return ERROR_DRIVER_NOT_LOADED;
    }
    let mut inits = INITS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *inits == 0 {
        *ENUMERATED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = scenario
            .devices
            .iter()
            .filter_map(|d| d.uuid.clone())
            .collect();
    }
    *STATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(visible(scenario));
    *inits += 1;
    SUCCESS
}

/// `nvmlInitWithFlags`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> NvmlReturn {
    nvmlInit_v2()
}

/// `nvmlShutdown`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    record("nvmlShutdown");
    let mut inits = INITS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if *inits == 0 {
        return ERROR_UNINITIALIZED;
    }
    *inits -= 1;
    if *inits == 0 {
        STATE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
    SUCCESS
}

/// `nvmlErrorString`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(_result: NvmlReturn) -> *const c_char {
    c"fake NVML error".as_ptr()
}

/// `nvmlDeviceGetCount_v2`: re-reads the scenario.
///
/// # Safety
/// `count` must be null or point to a writable `unsigned int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> NvmlReturn {
    record("nvmlDeviceGetCount_v2");
    let mut state = STATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if state.is_none() {
        return ERROR_UNINITIALIZED;
    }
    let scenario = load();
    if scenario.gone {
        return ERROR_DRIVER_NOT_LOADED;
    }
    // A device gone from the list is forgotten until the next enumeration.
    ENUMERATED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .retain(|u| scenario.devices.iter().any(|d| d.uuid.as_ref() == Some(u)));
    let scenario = visible(scenario);
    let n = scenario.devices.len() as c_uint;
    *state = Some(scenario);
    // SAFETY: forwarded from the caller.
    unsafe { put(count, Some(n)) }
}

/// `nvmlDeviceGetHandleByIndex_v2`.
///
/// # Safety
/// `device` must be null or point to a writable handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut Device,
) -> NvmlReturn {
    record("nvmlDeviceGetHandleByIndex_v2");
    let state = STATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(scenario) = state.as_ref() else {
        return ERROR_UNINITIALIZED;
    };
    if index as usize >= scenario.devices.len() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: forwarded from the caller.
    unsafe { put(device, Some((index as usize + 1) as Device)) }
}

/// `nvmlDeviceGetName`.
///
/// # Safety
/// `name` must be null or hold `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: Device,
    name: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded from the caller.
    with_device("nvmlDeviceGetName", device, |d| unsafe {
        put_str(name, length, d.name.as_deref())
    })
}

/// `nvmlDeviceGetUUID`.
///
/// # Safety
/// `uuid` must be null or hold `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: Device,
    uuid: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded from the caller.
    with_device("nvmlDeviceGetUUID", device, |d| unsafe {
        put_str(uuid, length, d.uuid.as_deref())
    })
}

/// `nvmlPciInfo_t`.
#[repr(C)]
pub struct PciInfo {
    bus_id_legacy: [c_char; 16],
    domain: c_uint,
    bus: c_uint,
    device: c_uint,
    pci_device_id: c_uint,
    pci_sub_system_id: c_uint,
    bus_id: [c_char; 32],
}

/// `nvmlDeviceGetPciInfo_v3`.
///
/// # Safety
/// `pci` must be null or point to a writable `nvmlPciInfo_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(device: Device, pci: *mut PciInfo) -> NvmlReturn {
    with_device("nvmlDeviceGetPciInfo_v3", device, |d| {
        let Some(bus_id) = d.pci_bus_id.as_deref() else {
            return ERROR_NOT_SUPPORTED;
        };
        if pci.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: non-null pointer to a caller-owned nvmlPciInfo_t; zeroed then filled.
        unsafe {
            pci.write(std::mem::zeroed());
            let info = &mut *pci;
            info.pci_device_id = 0x2702_10de;
            put_str(info.bus_id.as_mut_ptr(), 32, Some(bus_id))
        }
    })
}

/// `nvmlUtilization_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

/// `nvmlDeviceGetUtilizationRates`.
///
/// # Safety
/// `out` must be null or point to a writable `nvmlUtilization_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: Device,
    out: *mut Utilization,
) -> NvmlReturn {
    with_device("nvmlDeviceGetUtilizationRates", device, |d| {
        let value = d.utilization_gpu_percent.map(|gpu| Utilization {
            gpu,
            memory: d.utilization_memory_percent.unwrap_or(0),
        });
        // SAFETY: forwarded from the caller.
        unsafe { put(out, value) }
    })
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// `nvmlDeviceGetMemoryInfo_v2`.
///
/// # Safety
/// `out` must be null or point to a writable `nvmlMemory_v2_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: Device,
    out: *mut MemoryV2,
) -> NvmlReturn {
    with_device("nvmlDeviceGetMemoryInfo_v2", device, |d| {
        let value = d
            .memory_total_bytes
            .zip(d.memory_used_bytes)
            .map(|(total, used)| MemoryV2 {
                version: (std::mem::size_of::<MemoryV2>() | (2 << 24)) as c_uint,
                total,
                reserved: 0,
                free: total.saturating_sub(used),
                used,
            });
        // SAFETY: forwarded from the caller.
        unsafe { put(out, value) }
    })
}

/// `nvmlDeviceGetTemperature` (only the GPU sensor, 0, exists).
///
/// # Safety
/// `out` must be null or point to a writable `unsigned int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: Device,
    sensor: c_int,
    out: *mut c_uint,
) -> NvmlReturn {
    with_device("nvmlDeviceGetTemperature", device, |d| {
        let value = if sensor == 0 {
            d.temperature_gpu_celsius
        } else {
            None
        };
        // SAFETY: forwarded from the caller.
        unsafe { put(out, value) }
    })
}

/// `nvmlDeviceGetPowerUsage`.
///
/// # Safety
/// `out` must be null or point to a writable `unsigned int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(device: Device, out: *mut c_uint) -> NvmlReturn {
    // SAFETY: forwarded from the caller.
    with_device("nvmlDeviceGetPowerUsage", device, |d| unsafe {
        put(out, d.power_usage_milliwatts)
    })
}

/// `nvmlDeviceGetEnforcedPowerLimit`.
///
/// # Safety
/// `out` must be null or point to a writable `unsigned int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: Device,
    out: *mut c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded from the caller.
    with_device("nvmlDeviceGetEnforcedPowerLimit", device, |d| unsafe {
        put(out, d.enforced_power_limit_milliwatts)
    })
}

/// `nvmlDeviceGetTotalEnergyConsumption`.
///
/// # Safety
/// `out` must be null or point to a writable `unsigned long long`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: Device,
    out: *mut c_ulonglong,
) -> NvmlReturn {
    // SAFETY: forwarded from the caller.
    with_device("nvmlDeviceGetTotalEnergyConsumption", device, |d| unsafe {
        put(out, d.total_energy_millijoules)
    })
}

/// `nvmlDeviceGetClockInfo`: 0 graphics, 1 SM, 2 memory.
///
/// # Safety
/// `out` must be null or point to a writable `unsigned int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: Device,
    clock: c_int,
    out: *mut c_uint,
) -> NvmlReturn {
    with_device("nvmlDeviceGetClockInfo", device, |d| {
        let value = match clock {
            0 => d.clocks_mhz.graphics,
            1 => d.clocks_mhz.sm,
            2 => d.clocks_mhz.memory,
            _ => None,
        };
        // SAFETY: forwarded from the caller.
        unsafe { put(out, value) }
    })
}

/// `nvmlDeviceGetNumFans`: NOT_SUPPORTED for fanless parts, like real data-center GPUs.
///
/// # Safety
/// `out` must be null or point to a writable `unsigned int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNumFans(device: Device, out: *mut c_uint) -> NvmlReturn {
    with_device("nvmlDeviceGetNumFans", device, |d| {
        let fans = d
            .fan_speeds_percent
            .as_ref()
            .filter(|f| !f.is_empty())
            .map(|f| f.len() as c_uint);
        // SAFETY: forwarded from the caller.
        unsafe { put(out, fans) }
    })
}

/// `nvmlDeviceGetFanSpeed_v2`.
///
/// # Safety
/// `out` must be null or point to a writable `unsigned int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetFanSpeed_v2(
    device: Device,
    fan: c_uint,
    out: *mut c_uint,
) -> NvmlReturn {
    with_device("nvmlDeviceGetFanSpeed_v2", device, |d| {
        let value = d
            .fan_speeds_percent
            .as_ref()
            .and_then(|f| f.get(fan as usize).copied());
        // SAFETY: forwarded from the caller.
        unsafe { put(out, value) }
    })
}

/// `nvmlDeviceGetCurrentClocksThrottleReasons`.
///
/// # Safety
/// `out` must be null or point to a writable `unsigned long long`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: Device,
    out: *mut c_ulonglong,
) -> NvmlReturn {
    // SAFETY: forwarded from the caller.
    with_device(
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        device,
        |d| unsafe { put(out, d.clocks_event_reasons) },
    )
}

/// `nvmlProcessInfo_t` (the v2 layout the _v3 calls use).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// NVML_VALUE_NOT_AVAILABLE for unsigned long long.
const NOT_AVAILABLE: c_ulonglong = c_ulonglong::MAX;

/// The two-step process listing NVML does: with too small a buffer, say how many.
unsafe fn list_processes(
    d: &FakeDevice,
    kind: &str,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> NvmlReturn {
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let list: Vec<ProcessInfo> = d
        .processes
        .iter()
        .filter(|p| p.kind == kind)
        .map(|p| ProcessInfo {
            pid: p.pid,
            used_gpu_memory: p.used_memory_bytes.unwrap_or(NOT_AVAILABLE),
            gpu_instance_id: c_uint::MAX,
            compute_instance_id: c_uint::MAX,
        })
        .collect();
    // SAFETY: `count` is non-null (checked) and points to the caller's capacity.
    unsafe {
        let capacity = count.read() as usize;
        count.write(list.len() as c_uint);
        if list.is_empty() {
            return SUCCESS;
        }
        if capacity < list.len() || infos.is_null() {
            return ERROR_INSUFFICIENT_SIZE;
        }
        std::ptr::copy_nonoverlapping(list.as_ptr(), infos, list.len());
    }
    SUCCESS
}

/// `nvmlDeviceGetComputeRunningProcesses_v3`.
///
/// # Safety
/// `count` must point to the capacity of `infos` (or 0 with a null `infos`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> NvmlReturn {
    // SAFETY: forwarded from the caller.
    with_device(
        "nvmlDeviceGetComputeRunningProcesses_v3",
        device,
        |d| unsafe { list_processes(d, "compute", count, infos) },
    )
}

/// `nvmlDeviceGetGraphicsRunningProcesses_v3`.
///
/// # Safety
/// `count` must point to the capacity of `infos` (or 0 with a null `infos`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> NvmlReturn {
    // SAFETY: forwarded from the caller.
    with_device(
        "nvmlDeviceGetGraphicsRunningProcesses_v3",
        device,
        |d| unsafe { list_processes(d, "graphics", count, infos) },
    )
}

/// `nvmlSystemGetDriverVersion`.
///
/// # Safety
/// `out` must be null or hold `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    out: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    record("nvmlSystemGetDriverVersion");
    let state = STATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(scenario) = state.as_ref() else {
        return ERROR_UNINITIALIZED;
    };
    // SAFETY: forwarded from the caller.
    unsafe { put_str(out, length, scenario.driver_version.as_deref()) }
}

/// `nvmlSystemGetCudaDriverVersion_v2`.
///
/// # Safety
/// `out` must be null or point to a writable `int`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(out: *mut c_int) -> NvmlReturn {
    record("nvmlSystemGetCudaDriverVersion_v2");
    let state = STATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(scenario) = state.as_ref() else {
        return ERROR_UNINITIALIZED;
    };
    // SAFETY: forwarded from the caller.
    unsafe { put(out, scenario.cuda_driver_version) }
}

/// `nvmlDeviceGetEncoderUtilization`; the sampling period is a fixed 167 ms, as drivers report.
///
/// # Safety
/// `out` and `period` must be null or point to writable `unsigned int`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEncoderUtilization(
    device: Device,
    out: *mut c_uint,
    period: *mut c_uint,
) -> NvmlReturn {
    with_device("nvmlDeviceGetEncoderUtilization", device, |d| {
        // SAFETY: forwarded from the caller.
        unsafe { put_utilization(out, period, d.encoder_utilization_percent) }
    })
}

/// `nvmlDeviceGetDecoderUtilization`.
///
/// # Safety
/// `out` and `period` must be null or point to writable `unsigned int`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetDecoderUtilization(
    device: Device,
    out: *mut c_uint,
    period: *mut c_uint,
) -> NvmlReturn {
    with_device("nvmlDeviceGetDecoderUtilization", device, |d| {
        // SAFETY: forwarded from the caller.
        unsafe { put_utilization(out, period, d.decoder_utilization_percent) }
    })
}

unsafe fn put_utilization(
    out: *mut c_uint,
    period: *mut c_uint,
    value: Option<c_uint>,
) -> NvmlReturn {
    if value.is_some() && period.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: forwarded from the caller; `period` checked non-null when written.
    unsafe {
        let code = put(out, value);
        if code == SUCCESS {
            period.write(167_000);
        }
        code
    }
}

macro_rules! pcie_call {
    ($name:ident, $field:ident) => {
        #[doc = concat!("`", stringify!($name), "`.")]
        ///
        /// # Safety
        /// `out` must be null or point to a writable `unsigned int`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(device: Device, out: *mut c_uint) -> NvmlReturn {
            with_device(stringify!($name), device, |d| {
                // SAFETY: forwarded from the caller.
                unsafe { put(out, d.pcie.as_ref().and_then(|p| p.$field)) }
            })
        }
    };
}

pcie_call!(nvmlDeviceGetCurrPcieLinkGeneration, link_gen_current);
pcie_call!(nvmlDeviceGetMaxPcieLinkGeneration, link_gen_max);
pcie_call!(nvmlDeviceGetCurrPcieLinkWidth, link_width_current);
pcie_call!(nvmlDeviceGetMaxPcieLinkWidth, link_width_max);

/// `nvmlFieldValue_t`.
#[repr(C)]
pub struct FieldValue {
    field_id: c_uint,
    scope_id: c_uint,
    timestamp: i64,
    latency_usec: i64,
    value_type: c_uint,
    nvml_return: NvmlReturn,
    value: u64,
}

const VALUE_TYPE_UNSIGNED_INT: c_uint = 1;
const VALUE_TYPE_UNSIGNED_LONG_LONG: c_uint = 3;

/// A field's answer: its NVML value type and value, or NOT_SUPPORTED.
fn field_value(d: &FakeDevice, field: c_uint) -> Option<(c_uint, u64)> {
    let ull = |v: Option<c_ulonglong>| v.map(|v| (VALUE_TYPE_UNSIGNED_LONG_LONG, v));
    let ui = |v: Option<u64>| v.map(|v| (VALUE_TYPE_UNSIGNED_INT, v));
    let flag = |v: Option<bool>| ui(v.map(u64::from));
    let ecc = d.ecc.as_ref();
    let retired = d.retired_pages.as_ref();
    let remapped = d.remapped_rows.as_ref();
    match field {
        3 => ull(ecc.and_then(|e| e.corrected_volatile)),
        4 => ull(ecc.and_then(|e| e.uncorrected_volatile)),
        5 => ull(ecc.and_then(|e| e.corrected_aggregate)),
        6 => ull(ecc.and_then(|e| e.uncorrected_aggregate)),
        29 => ull(retired.and_then(|r| r.single_bit)),
        30 => ull(retired.and_then(|r| r.double_bit)),
        31 => flag(retired.and_then(|r| r.pending)),
        82 => ui(d.memory_temperature_celsius.map(u64::from)),
        94 => ull(d.pcie.as_ref().and_then(|p| p.replay_counter)),
        142 => ui(remapped.and_then(|r| r.correctable)),
        143 => ui(remapped.and_then(|r| r.uncorrectable)),
        144 => flag(remapped.and_then(|r| r.pending)),
        145 => flag(remapped.and_then(|r| r.failure)),
        _ => None,
    }
}

/// `nvmlDeviceGetFieldValues`: each field gets its own return code (NOT_SUPPORTED for what
/// the device lacks); the call as a whole succeeds.
///
/// # Safety
/// `values` must be null or point to `count` writable `nvmlFieldValue_t`s with `fieldId` set.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: Device,
    count: c_int,
    values: *mut FieldValue,
) -> NvmlReturn {
    with_device("nvmlDeviceGetFieldValues", device, |d| {
        let Ok(count) = usize::try_from(count) else {
            return ERROR_INVALID_ARGUMENT;
        };
        if values.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        // SAFETY: the caller's array holds `count` entries.
        let values = unsafe { std::slice::from_raw_parts_mut(values, count) };
        for v in values {
            match field_value(d, v.field_id) {
                Some((value_type, value)) => {
                    v.value_type = value_type;
                    v.value = value;
                    v.nvml_return = SUCCESS;
                }
                None => v.nvml_return = ERROR_NOT_SUPPORTED,
            }
        }
        SUCCESS
    })
}

/// `nvmlEventTypeXidCriticalError`.
const EVENT_XID: c_ulonglong = 0x8;

/// Opaque event-set handle: its number + 1 (never null).
type EventSet = *mut std::ffi::c_void;

/// Event sets (by number; `None` once freed, each listing the UUIDs registered in it).
#[derive(Default)]
struct Events {
    sets: Vec<Option<Vec<String>>>,
}

/// How many of each UUID's `xids` were delivered. Kept in a file next to the scenario: the
/// library is unloaded when its last user shuts down, and an XID, a kernel event, must not
/// come again with the next load.
fn delivered_path() -> Option<std::path::PathBuf> {
    let mut path = std::env::var_os("FAKE_NVML_SCENARIO")?;
    path.push(".xids-delivered");
    Some(path.into())
}

fn read_delivered() -> std::collections::HashMap<String, usize> {
    delivered_path()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_delivered(delivered: &std::collections::HashMap<String, usize>) {
    if let Some(path) = delivered_path()
        && let Ok(text) = serde_json::to_vec(delivered)
    {
        let tmp = path.with_extension("tmp-delivered");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(tmp, path);
        }
    }
}

static EVENTS: Mutex<Option<Events>> = Mutex::new(None);

fn events<T>(f: impl FnOnce(&mut Events) -> T) -> T {
    let mut events = EVENTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(events.get_or_insert_with(Events::default))
}

/// `nvmlDeviceGetSupportedEventTypes`.
///
/// # Safety
/// `out` must be null or point to a writable `unsigned long long`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: Device,
    out: *mut c_ulonglong,
) -> NvmlReturn {
    with_device("nvmlDeviceGetSupportedEventTypes", device, |d| {
        let types = if d.xid_events.unwrap_or(true) {
            EVENT_XID
        } else {
            0
        };
        // SAFETY: forwarded from the caller.
        unsafe { put(out, Some(types)) }
    })
}

/// `nvmlEventSetCreate`.
///
/// # Safety
/// `set` must be null or point to a writable handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut EventSet) -> NvmlReturn {
    record("nvmlEventSetCreate");
    if STATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .is_none()
    {
        return ERROR_UNINITIALIZED;
    }
    let number = events(|e| {
        e.sets.push(Some(Vec::new()));
        e.sets.len()
    });
    // SAFETY: forwarded from the caller.
    unsafe { put(set, Some(number as EventSet)) }
}

fn set_index(set: EventSet) -> Option<usize> {
    (set as usize).checked_sub(1)
}

/// `nvmlDeviceRegisterEvents`: only XID critical errors are known here.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: Device,
    types: c_ulonglong,
    set: EventSet,
) -> NvmlReturn {
    with_device("nvmlDeviceRegisterEvents", device, |d| {
        if types & !EVENT_XID != 0 || !d.xid_events.unwrap_or(true) {
            return ERROR_NOT_SUPPORTED;
        }
        let Some(uuid) = d.uuid.clone() else {
            return ERROR_UNKNOWN;
        };
        events(|e| match set_index(set).and_then(|i| e.sets.get_mut(i)) {
            Some(Some(uuids)) => {
                if !uuids.contains(&uuid) {
                    uuids.push(uuid);
                }
                SUCCESS
            }
            _ => ERROR_INVALID_ARGUMENT,
        })
    })
}

/// `nvmlEventData_t`.
#[repr(C)]
pub struct EventData {
    device: Device,
    event_type: c_ulonglong,
    event_data: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// The next undelivered XID of a device registered in `set`, with that device's handle now;
/// the device then answers as lost if the scenario says so.
fn next_event(set: EventSet) -> Result<Option<(Device, c_ulonglong)>, NvmlReturn> {
    let Some((handle, xid, device)) = next_xid(set)? else {
        return Ok(None);
    };
    // The driver reports an XID once it knows of the fault: a GPU the scenario now says is
    // lost answers GPU_IS_LOST from here on, not only after the next device count (the XID
    // thread asks it at once). Outside `events`: STATE is taken before EVENTS elsewhere.
    if let Some(known) = STATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_mut()
        .and_then(|s| s.devices.iter_mut().find(|d| d.uuid == device.uuid))
    {
        known.lost = device.lost;
        known.lost_calls.clone_from(&device.lost_calls);
    }
    Ok(Some((handle, xid)))
}

/// The next undelivered XID of a device registered in `set`, with that device (as the
/// scenario has it now) and its handle.
fn next_xid(set: EventSet) -> Result<Option<(Device, c_ulonglong, FakeDevice)>, NvmlReturn> {
    if STATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .is_none()
    {
        return Err(ERROR_UNINITIALIZED);
    }
    let scenario = load_cached();
    if scenario.gone {
        return Err(ERROR_UNKNOWN);
    }
    let scenario = visible(scenario);
    events(|e| {
        let Some(Some(uuids)) = set_index(set).and_then(|i| e.sets.get(i)) else {
            return Err(ERROR_INVALID_ARGUMENT);
        };
        let mut delivered = None;
        for uuid in uuids {
            let found = scenario
                .devices
                .iter()
                .enumerate()
                .find(|(_, d)| d.uuid.as_deref() == Some(uuid));
            let Some((index, device)) = found else {
                continue;
            };
            if device.xids.is_empty() {
                continue;
            }
            let delivered = delivered.get_or_insert_with(read_delivered);
            let count = delivered.get(uuid).copied().unwrap_or(0);
            if let Some(&xid) = device.xids.get(count) {
                delivered.insert(uuid.clone(), count + 1);
                write_delivered(delivered);
                return Ok(Some(((index + 1) as Device, xid, device.clone())));
            }
        }
        Ok(None)
    })
}

/// `nvmlEventSetWait_v2`: the next XID, or NVML_ERROR_TIMEOUT after `timeout_ms`.
///
/// # Safety
/// `data` must be null or point to a writable `nvmlEventData_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: EventSet,
    data: *mut EventData,
    timeout_ms: c_uint,
) -> NvmlReturn {
    record("nvmlEventSetWait_v2");
    if data.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(u64::from(timeout_ms));
    loop {
        match next_event(set) {
            Err(code) => return code,
            Ok(Some((device, xid))) => {
                // SAFETY: non-null (checked) pointer to the caller's nvmlEventData_t.
                unsafe {
                    data.write(EventData {
                        device,
                        event_type: EVENT_XID,
                        event_data: xid,
                        gpu_instance_id: c_uint::MAX,
                        compute_instance_id: c_uint::MAX,
                    });
                }
                return SUCCESS;
            }
            Ok(None) => {}
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return ERROR_TIMEOUT;
        }
        std::thread::sleep((deadline - now).min(std::time::Duration::from_millis(50)));
    }
}

/// `nvmlEventSetFree`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetFree(set: EventSet) -> NvmlReturn {
    record("nvmlEventSetFree");
    events(|e| match set_index(set).and_then(|i| e.sets.get_mut(i)) {
        Some(slot @ Some(_)) => {
            *slot = None;
            SUCCESS
        }
        _ => ERROR_INVALID_ARGUMENT,
    })
}
