//! A stand-in for `libnvidia-ml.so.1`, for tests on machines without an NVIDIA GPU.
//!
//! It exports the NVML C functions aistack-exporter calls (through nvml-wrapper) and answers
//! them from a JSON scenario named by `FAKE_NVML_SCENARIO`, in the recorded-GPU fixture format
//! (`tests/fixtures/gpu/*.json`): a field that is `null` answers `NVML_ERROR_NOT_SUPPORTED`.
//! Knobs on top:
//!
//! - `"gone": true` — the driver is not loaded: `nvmlInit_v2` and `nvmlDeviceGetCount_v2`
//!   answer `NVML_ERROR_DRIVER_NOT_LOADED` (a driver reload, an unplugged eGPU).
//! - a device's `"lost": true` — its calls answer `NVML_ERROR_GPU_IS_LOST`.
//!
//! The scenario is re-read by `nvmlInit_v2` and `nvmlDeviceGetCount_v2`, so a test changes what
//! the "driver" says by rewriting the file. Every call is counted in `FAKE_NVML_CALLS` when set
//! (one line per call), so tests can see what was asked.
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
const ERROR_GPU_IS_LOST: NvmlReturn = 15;

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

/// `None` until `nvmlInit_v2` succeeded.
static STATE: Mutex<Option<Scenario>> = Mutex::new(None);

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
    if device.lost {
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
    *STATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(scenario);
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
    STATE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
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
        let value = d
            .utilization_gpu_percent
            .map(|gpu| Utilization { gpu, memory: 0 });
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
