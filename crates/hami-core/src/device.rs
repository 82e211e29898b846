//! Which of the container's devices a CUDA device or an NVML handle is.
//!
//! Limits and usage are kept per *container device index*: the position of
//! the card in the container's device list (`CUDA_DEVICE_MEMORY_LIMIT_<i>`,
//! the region's device entries). A process's CUDA ordinal is not that index:
//! workers of one pod (Ray, vLLM tensor parallel, torchrun ranks) each set
//! their own `CUDA_VISIBLE_DEVICES`, so each sees its card as ordinal 0.
//! Cards are therefore identified by UUID (`cuDeviceGetUuid`,
//! `nvmlDeviceGetUUID`), and the index of a UUID is, first match wins:
//!
//! 1. where the region's device table has it (filled by the node agent, or
//!    by an earlier process of the container through rule 2 or 3);
//! 2. its position in `NVIDIA_VISIBLE_DEVICES` when that lists UUIDs (the
//!    device plugin sets it so, in the order of the per-device limits); the
//!    UUID is then recorded at that index of the region;
//! 3. otherwise (`hami run`, no device list): the first free index of the
//!    region, the process's CUDA ordinal first, claimed with one
//!    compare-and-swap, so two workers that both see a different card as
//!    ordinal 0 still count apart.
//!
//! A CUDA ordinal's index is cached for the life of the process (the
//! ordinal -> card mapping is fixed once the driver is initialised).

use crate::ffi::*;
use crate::state::global;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering::*};

static CTX_GET_DEVICE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static CTX_GET_CURRENT: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static DEVICE_GET_UUID: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

const CACHED: usize = 64;
/// CUDA ordinal -> 1 + container index; 0 = not known yet.
static ORDINAL_INDEX: [AtomicU32; CACHED] = [const { AtomicU32::new(0) }; CACHED];

/// The current context's device (CUDA ordinal), from the real driver; 0 if
/// there is none.
pub(crate) fn current_ordinal() -> c_int {
    let p = crate::dl::resolve(&CTX_GET_DEVICE, b"cuCtxGetDevice\0", crate::dl::Lib::Cuda);
    if p.is_null() {
        return 0;
    }
    // SAFETY: the driver's cuCtxGetDevice(CUdevice*).
    let f = unsafe {
        std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut c_int) -> CUresult>(p)
    };
    let mut d: c_int = 0;
    // SAFETY: valid out pointer.
    if unsafe { f(&mut d) } == CUDA_SUCCESS && d >= 0 {
        d
    } else {
        0
    }
}

/// The current context (0 if none): what a context destroy or reset frees.
pub(crate) fn current_context() -> usize {
    let p = crate::dl::resolve(&CTX_GET_CURRENT, b"cuCtxGetCurrent\0", crate::dl::Lib::Cuda);
    if p.is_null() {
        return 0;
    }
    // SAFETY: the driver's cuCtxGetCurrent(CUcontext*).
    let f = unsafe {
        std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut usize) -> CUresult>(p)
    };
    let mut c = 0usize;
    // SAFETY: valid out pointer.
    if unsafe { f(&mut c) } == CUDA_SUCCESS {
        c
    } else {
        0
    }
}

/// The container index of the current context's device.
pub(crate) fn current_device() -> usize {
    index_of_ordinal(current_ordinal())
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` of CUDA device `ordinal`.
fn cuda_uuid(ordinal: c_int) -> Option<String> {
    let p = crate::dl::resolve(&DEVICE_GET_UUID, b"cuDeviceGetUuid\0", crate::dl::Lib::Cuda);
    if p.is_null() {
        return None;
    }
    // SAFETY: the driver's cuDeviceGetUuid(CUuuid*, CUdevice).
    let f = unsafe {
        std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut [u8; 16], c_int) -> CUresult>(
            p,
        )
    };
    let mut b = [0u8; 16];
    // SAFETY: 16-byte out buffer.
    if unsafe { f(&mut b, ordinal) } != CUDA_SUCCESS {
        return None;
    }
    Some(format_uuid(&b))
}

/// The text form NVML and `nvidia-smi -L` use.
pub fn format_uuid(b: &[u8; 16]) -> String {
    use std::fmt::Write;
    let mut s = String::from("GPU-");
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// The container index of CUDA device `ordinal` (see the module docs).
pub(crate) fn index_of_ordinal(ordinal: c_int) -> usize {
    let Ok(o) = usize::try_from(ordinal) else {
        return 0;
    };
    if let Some(c) = ORDINAL_INDEX.get(o) {
        let v = c.load(Relaxed);
        if v != 0 {
            return v as usize - 1;
        }
    }
    // Without a UUID (driver not initialised yet): the ordinal, uncached.
    let Some(uuid) = cuda_uuid(ordinal) else {
        return o;
    };
    let index = index_of_uuid(&uuid, Some(o)).unwrap_or(o);
    if let Some(c) = ORDINAL_INDEX.get(o) {
        c.store(index as u32 + 1, Relaxed);
    }
    hlog!(
        crate::log::INFO,
        "CUDA device {ordinal} ({uuid}) is the container's device {index}"
    );
    index
}

/// The position of `uuid` in `NVIDIA_VISIBLE_DEVICES`, when that lists UUIDs.
pub(crate) fn listed_position(uuid: &str) -> Option<usize> {
    let list = global().env.nvidia_visible_devices.as_deref()?;
    let key = hami_shm::region::uuid_key(uuid);
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    if !entries
        .iter()
        .all(|e| e.starts_with("GPU-") || e.starts_with("MIG-"))
    {
        // "all", "none", indices: no order to go by.
        return None;
    }
    entries
        .iter()
        .position(|e| hami_shm::region::uuid_key(e) == key)
}

/// The container index of the card `uuid`; `fallback` is the index to
/// prefer when neither the region nor `NVIDIA_VISIBLE_DEVICES` knows it.
/// `None` when it cannot be placed (all indices hold other cards).
pub(crate) fn index_of_uuid(uuid: &str, fallback: Option<usize>) -> Option<usize> {
    let region = &global().region;
    if let Some(i) = region.find_device(uuid) {
        return Some(i);
    }
    if let Some(i) = listed_position(uuid) {
        if let Some(j) = region.claim_device(uuid, Some(i))
            && j != i
        {
            hlog!(
                crate::log::WARN,
                "{uuid} is device {i} of NVIDIA_VISIBLE_DEVICES but the region's index {i} holds another card; recorded at {j}, counted at {i}"
            );
        }
        return Some(i);
    }
    region.claim_device(uuid, fallback)
}

#[cfg(test)]
mod tests {
    #[test]
    fn uuids_are_formatted_like_nvml() {
        let b = [
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
            0xcd, 0xef,
        ];
        assert_eq!(
            super::format_uuid(&b),
            "GPU-01234567-89ab-cdef-0123-456789abcdef"
        );
    }
}
