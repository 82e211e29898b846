//! The container's view through NVML (what `nvidia-smi` shows): memory
//! totals are the limit, used is the container's usage, and process
//! listings keep only the container's processes.
//!
//! An NVML device is the container's device of the same UUID (see
//! [`crate::device`]): the index the region's table gives it, else its
//! position in `NVIDIA_VISIBLE_DEVICES`, else (no device list) the index
//! of its CUDA ordinal, mapped through `CUDA_VISIBLE_DEVICES` (indices or
//! UUIDs; without it the NVML index is the ordinal). A card CUDA cannot
//! see and no list names is left untouched.

use crate::ffi::*;
use crate::state::{global, process};
use std::ffi::{c_char, c_uint, c_void};
use std::sync::atomic::AtomicPtr;

static GET_INDEX: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static GET_UUID: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

fn nvml_index(dev: usize) -> Option<u32> {
    let f = crate::dl::resolve(&GET_INDEX, b"nvmlDeviceGetIndex\0", crate::dl::Lib::Nvml);
    if f.is_null() {
        return None;
    }
    // SAFETY: NVML's nvmlDeviceGetIndex(nvmlDevice_t, unsigned*).
    let f = unsafe {
        std::mem::transmute::<*mut c_void, unsafe extern "C" fn(usize, *mut c_uint) -> NvmlReturn>(
            f,
        )
    };
    let mut i = 0;
    // SAFETY: valid out pointer.
    (unsafe { f(dev, &mut i) } == NVML_SUCCESS).then_some(i)
}

fn nvml_uuid(dev: usize) -> Option<String> {
    let f = crate::dl::resolve(&GET_UUID, b"nvmlDeviceGetUUID\0", crate::dl::Lib::Nvml);
    if f.is_null() {
        return None;
    }
    type F = unsafe extern "C" fn(usize, *mut c_char, c_uint) -> NvmlReturn;
    // SAFETY: NVML's nvmlDeviceGetUUID.
    let f = unsafe { std::mem::transmute::<*mut c_void, F>(f) };
    let mut buf = [0u8; 96];
    // SAFETY: buffer of the given length.
    if unsafe { f(dev, buf.as_mut_ptr().cast(), buf.len() as c_uint) } != NVML_SUCCESS {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// CUDA ordinal of an NVML device, `None` when CUDA cannot see it.
pub(crate) fn cuda_ordinal(dev: usize) -> Option<usize> {
    let idx = nvml_index(dev)?;
    let visible = match global().env.visible_devices.as_deref() {
        None => return Some(idx as usize),
        Some(v) if v.trim().is_empty() => return Some(idx as usize),
        Some(v) => v,
    };
    let entries: Vec<&str> = visible.split(',').map(str::trim).collect();
    if let Some(pos) = entries
        .iter()
        .position(|e| e.parse::<u32>().ok() == Some(idx))
    {
        return Some(pos);
    }
    let uuid = nvml_uuid(dev)?;
    entries
        .iter()
        .position(|e| !e.is_empty() && e.parse::<u32>().is_err() && uuid.starts_with(e))
}

/// The container's device index of an NVML device, `None` when the
/// container cannot see it.
pub(crate) fn container_index(dev: usize) -> Option<usize> {
    let uuid = nvml_uuid(dev);
    if let Some(uuid) = &uuid {
        let g = global();
        if let Some(i) = g.region.find_device(uuid) {
            return Some(i);
        }
        if let Some(i) = crate::device::listed_position(uuid) {
            return Some(i);
        }
    }
    let ordinal = cuda_ordinal(dev)?;
    match uuid {
        Some(uuid) => crate::device::index_of_uuid(&uuid, Some(ordinal)),
        None => Some(ordinal),
    }
}

/// (limit, used) of the container on this NVML device, when limited.
fn container_view(dev: usize) -> Option<(u64, u64)> {
    let index = container_index(dev)?;
    let g = global();
    let limit = g.memory_limit(index);
    if limit == 0 {
        return None;
    }
    process().reclaim_now_and_then(g);
    Some((limit, g.region.device_used(index)))
}

pub(crate) unsafe fn memory_info(
    real: unsafe extern "C" fn(usize, *mut NvmlMemory) -> NvmlReturn,
    dev: usize,
    m: *mut NvmlMemory,
) -> NvmlReturn {
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { real(dev, m) };
    if r == NVML_SUCCESS
        && !m.is_null()
        && let Some((limit, used)) = container_view(dev)
    {
        let used = used.min(limit);
        // SAFETY: non-null, written by NVML.
        unsafe {
            *m = NvmlMemory {
                total: limit,
                free: limit - used,
                used,
            }
        };
    }
    r
}

pub(crate) unsafe fn memory_info_v2(
    real: unsafe extern "C" fn(usize, *mut NvmlMemoryV2) -> NvmlReturn,
    dev: usize,
    m: *mut NvmlMemoryV2,
) -> NvmlReturn {
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { real(dev, m) };
    if r == NVML_SUCCESS
        && !m.is_null()
        && let Some((limit, used)) = container_view(dev)
    {
        let used = used.min(limit);
        // SAFETY: non-null, written by NVML; `version` is the caller's.
        unsafe {
            (*m).total = limit;
            (*m).reserved = 0;
            (*m).free = limit - used;
            (*m).used = used;
        }
    }
    r
}

/// Keeps the listed entries whose PID is one of the container's processes
/// (by container pid or learned host pid).
unsafe fn filter<T>(n: *mut c_uint, p: *mut T, pid_of: impl Fn(&T) -> u32) {
    if n.is_null() || p.is_null() {
        return;
    }
    // Container pids, and the host pids learned for them (NVML reports
    // host pids; inside a pid namespace they differ).
    let ours: Vec<u32> = global()
        .region
        .processes()
        .iter()
        .flat_map(|i| [i.pid as u32, i.host_pid as u32])
        .filter(|&p| p != 0)
        .collect();
    // SAFETY: NVML wrote `*n` entries at `p`.
    let items = unsafe { std::slice::from_raw_parts_mut(p, *n as usize) };
    let mut kept = 0;
    for i in 0..items.len() {
        if ours.contains(&pid_of(&items[i])) {
            items.swap(kept, i);
            kept += 1;
        }
    }
    // SAFETY: non-null.
    unsafe { *n = kept as c_uint };
}

pub(crate) unsafe fn processes(
    real: unsafe extern "C" fn(usize, *mut c_uint, *mut NvmlProcessInfo) -> NvmlReturn,
    dev: usize,
    n: *mut c_uint,
    p: *mut NvmlProcessInfo,
) -> NvmlReturn {
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { real(dev, n, p) };
    if r == NVML_SUCCESS {
        // SAFETY: NVML filled the list.
        unsafe { filter(n, p, |i| i.pid) };
    }
    r
}

pub(crate) unsafe fn processes_v1(
    real: unsafe extern "C" fn(usize, *mut c_uint, *mut NvmlProcessInfoV1) -> NvmlReturn,
    dev: usize,
    n: *mut c_uint,
    p: *mut NvmlProcessInfoV1,
) -> NvmlReturn {
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { real(dev, n, p) };
    if r == NVML_SUCCESS {
        // SAFETY: NVML filled the list.
        unsafe { filter(n, p, |i| i.pid) };
    }
    r
}
