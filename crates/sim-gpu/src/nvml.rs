//! The simulated NVML. Device handles are `0x4E00 + index`.

use crate::state::state;
use std::ffi::{c_char, c_int, c_uint};

type NvmlReturn = c_int;
const SUCCESS: NvmlReturn = 0;
const INVALID_ARGUMENT: NvmlReturn = 2;
const INSUFFICIENT_SIZE: NvmlReturn = 7;
const HANDLE_BASE: usize = 0x4E00;

/// `nvmlMemory_t`.
#[repr(C)]
pub struct NvmlMemory {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct NvmlMemoryV2 {
    pub version: c_uint,
    pub total: u64,
    pub reserved: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlUtilization_t`.
#[repr(C)]
pub struct NvmlUtilization {
    pub gpu: c_uint,
    pub memory: c_uint,
}

/// `nvmlProcessInfo_t` (v2 and v3 listings).
#[repr(C)]
pub struct NvmlProcessInfo {
    pub pid: c_uint,
    pub used_gpu_memory: u64,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

/// `nvmlProcessInfo_v1_t`.
#[repr(C)]
pub struct NvmlProcessInfoV1 {
    pub pid: c_uint,
    pub used_gpu_memory: u64,
}

fn index(h: usize) -> Option<usize> {
    let i = h.checked_sub(HANDLE_BASE)?;
    (i < state().devices.len()).then_some(i)
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    drop(state());
    SUCCESS
}
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit() -> NvmlReturn {
    nvmlInit_v2()
}
#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(v: *mut c_char, len: c_uint) -> NvmlReturn {
    copy(v, len, "550.54.15")
}

fn copy(dst: *mut c_char, len: c_uint, s: &str) -> NvmlReturn {
    if dst.is_null() {
        return INVALID_ARGUMENT;
    }
    if (len as usize) <= s.len() {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: dst has `len` bytes per the API contract.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), dst.cast(), s.len());
        *dst.add(s.len()) = 0;
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(n: *mut c_uint) -> NvmlReturn {
    if n.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null.
    unsafe { *n = state().devices.len() as c_uint };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(i: c_uint, h: *mut usize) -> NvmlReturn {
    if h.is_null() || i as usize >= state().devices.len() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null.
    unsafe { *h = HANDLE_BASE + i as usize };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(h: usize, i: *mut c_uint) -> NvmlReturn {
    match (index(h), i.is_null()) {
        // SAFETY: checked non-null.
        (Some(x), false) => unsafe {
            *i = x as c_uint;
            SUCCESS
        },
        _ => INVALID_ARGUMENT,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(h: usize, name: *mut c_char, len: c_uint) -> NvmlReturn {
    match index(h) {
        Some(i) => copy(name, len, &state().devices[i].spec.name.clone()),
        None => INVALID_ARGUMENT,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(h: usize, uuid: *mut c_char, len: c_uint) -> NvmlReturn {
    match index(h) {
        Some(i) => copy(uuid, len, &state().devices[i].spec.uuid.clone()),
        None => INVALID_ARGUMENT,
    }
}

fn memory(h: usize) -> Option<(u64, u64)> {
    let i = index(h)?;
    let s = state();
    let used = s.devices[i].card_used().min(s.devices[i].spec.memory);
    Some((s.devices[i].spec.memory, used))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(h: usize, m: *mut NvmlMemory) -> NvmlReturn {
    match (memory(h), m.is_null()) {
        // SAFETY: checked non-null.
        (Some((total, used)), false) => unsafe {
            *m = NvmlMemory {
                total,
                free: total - used,
                used,
            };
            SUCCESS
        },
        _ => INVALID_ARGUMENT,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(h: usize, m: *mut NvmlMemoryV2) -> NvmlReturn {
    match (memory(h), m.is_null()) {
        // SAFETY: checked non-null; the caller sets `version`.
        (Some((total, used)), false) => unsafe {
            (*m).total = total;
            (*m).reserved = 0;
            (*m).free = total - used;
            (*m).used = used;
            SUCCESS
        },
        _ => INVALID_ARGUMENT,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    h: usize,
    u: *mut NvmlUtilization,
) -> NvmlReturn {
    match (index(h), u.is_null()) {
        // SAFETY: checked non-null.
        (Some(i), false) => unsafe {
            *u = NvmlUtilization {
                gpu: state().utilization(i),
                memory: 0,
            };
            SUCCESS
        },
        _ => INVALID_ARGUMENT,
    }
}

/// Every live process holding memory on the card. Pids are shifted by
/// `SIM_GPU_PID_OFFSET` (default 0), to play a container's pid namespace:
/// NVML reports host pids, which differ from the pids a container sees.
fn procs(h: usize) -> Option<Vec<(u32, u64)>> {
    let i = index(h)?;
    let offset: i64 = std::env::var("SIM_GPU_PID_OFFSET")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let list = state().devices[i].shared.processes();
    Some(
        list.into_iter()
            .map(|(pid, used)| ((pid as i64 + offset) as u32, used))
            .collect(),
    )
}

unsafe fn list<T>(
    h: usize,
    n: *mut c_uint,
    infos: *mut T,
    make: impl Fn(u32, u64) -> T,
) -> NvmlReturn {
    let Some(p) = procs(h) else {
        return INVALID_ARGUMENT;
    };
    if n.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null; `infos` has room for `*n` entries.
    unsafe {
        let room = *n as usize;
        *n = p.len() as c_uint;
        if room < p.len() {
            return INSUFFICIENT_SIZE;
        }
        if !p.is_empty() && infos.is_null() {
            return INVALID_ARGUMENT;
        }
        for (k, (pid, mem)) in p.into_iter().enumerate() {
            infos.add(k).write(make(pid, mem));
        }
    }
    SUCCESS
}

fn info(pid: u32, mem: u64) -> NvmlProcessInfo {
    NvmlProcessInfo {
        pid,
        used_gpu_memory: mem,
        gpu_instance_id: u32::MAX,
        compute_instance_id: u32::MAX,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    h: usize,
    n: *mut c_uint,
    p: *mut NvmlProcessInfo,
) -> NvmlReturn {
    // SAFETY: forwarded.
    unsafe { list(h, n, p, info) }
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v2(
    h: usize,
    n: *mut c_uint,
    p: *mut NvmlProcessInfo,
) -> NvmlReturn {
    // SAFETY: forwarded.
    unsafe { list(h, n, p, info) }
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses(
    h: usize,
    n: *mut c_uint,
    p: *mut NvmlProcessInfoV1,
) -> NvmlReturn {
    // SAFETY: forwarded.
    unsafe {
        list(h, n, p, |pid, used_gpu_memory| NvmlProcessInfoV1 {
            pid,
            used_gpu_memory,
        })
    }
}
