//! Learning the process's host pid, once.
//!
//! NVML reports host pids; inside a container's pid namespace a process
//! knows only its own (container) pid, so the container's process listings
//! would match nothing. The interposer learns its host pid the first time
//! it allocates device memory: it takes NVML's process list of that card
//! just before and just after the allocation. The entry that is new, or
//! whose memory grew by at least the allocation's size, is this process,
//! unless another process changed at the same moment: then, or when the
//! candidate is already claimed as another slot's host pid, the answer is
//! ambiguous and it tries again at its next allocation ([`TRIES`] times in
//! all). The host pid goes into the process's slot in the shared region,
//! where the NVML listing filter (and the node agent) find it. Without a pid
//! namespace the answer is simply the process's own pid.
//!
//! Costs two NVML listings per allocation, only until the host pid is known.

use crate::ffi::*;
use crate::state::{Global, Process};
use std::ffi::{c_uint, c_void};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering::*};

/// Allocations at which the interposer tries to learn its host pid.
pub(crate) const TRIES: u32 = 8;

static INIT: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static COUNT: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static HANDLE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static PROCS: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static INITIALISED: AtomicBool = AtomicBool::new(false);

fn nvml_fn<T: Copy>(slot: &AtomicPtr<c_void>, name: &[u8]) -> Option<T> {
    let p = crate::dl::resolve(slot, name, crate::dl::Lib::Nvml);
    // SAFETY: T is the NVML function type of that name (callers' contract).
    (!p.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

/// NVML's unfiltered process list (pid, used bytes) on the card that is
/// the container's device `dev`.
fn listing(dev: usize) -> Option<Vec<(u32, u64)>> {
    if !INITIALISED.load(Acquire) {
        let init: unsafe extern "C" fn() -> NvmlReturn = nvml_fn(&INIT, b"nvmlInit_v2\0")?;
        // SAFETY: no arguments; NVML counts initialisations.
        if unsafe { init() } != NVML_SUCCESS {
            return None;
        }
        INITIALISED.store(true, Release);
    }
    let count: unsafe extern "C" fn(*mut c_uint) -> NvmlReturn =
        nvml_fn(&COUNT, b"nvmlDeviceGetCount_v2\0")?;
    let handle: unsafe extern "C" fn(c_uint, *mut usize) -> NvmlReturn =
        nvml_fn(&HANDLE, b"nvmlDeviceGetHandleByIndex_v2\0")?;
    type List = unsafe extern "C" fn(usize, *mut c_uint, *mut NvmlProcessInfo) -> NvmlReturn;
    let list: List = nvml_fn(&PROCS, b"nvmlDeviceGetComputeRunningProcesses_v3\0")?;
    let mut n = 0;
    // SAFETY: valid out pointer.
    if unsafe { count(&mut n) } != NVML_SUCCESS {
        return None;
    }
    let h = (0..n).find_map(|i| {
        let mut h = 0usize;
        // SAFETY: valid out pointer.
        let ok = unsafe { handle(i, &mut h) } == NVML_SUCCESS;
        (ok && crate::nvml::container_index(h) == Some(dev)).then_some(h)
    })?;
    let mut buf: Vec<NvmlProcessInfo> = (0..256)
        .map(|_| NvmlProcessInfo {
            pid: 0,
            used_gpu_memory: 0,
            gpu_instance_id: 0,
            compute_instance_id: 0,
        })
        .collect();
    let mut len = buf.len() as c_uint;
    // SAFETY: room for `len` entries (the real function, not our filter).
    if unsafe { list(h, &mut len, buf.as_mut_ptr()) } != NVML_SUCCESS {
        return None;
    }
    buf.truncate(len as usize);
    Some(
        buf.into_iter()
            .map(|e| (e.pid, e.used_gpu_memory))
            .collect(),
    )
}

/// Before an allocation on `dev`: the listing to compare with, while the
/// host pid is still to be learned.
pub(crate) fn before(p: &Process, dev: usize) -> Option<Vec<(u32, u64)>> {
    if p.host_pid_tries.load(Relaxed) == 0 || p.slot == usize::MAX {
        return None;
    }
    let l = listing(dev);
    if l.is_none() {
        // No NVML (or not this card): a try spent, so it stops eventually.
        spend(p);
    }
    l
}

fn spend(p: &Process) {
    let _ = p
        .host_pid_tries
        .fetch_update(Relaxed, Relaxed, |t| Some(t.saturating_sub(1)));
}

/// After a successful allocation of `bytes` on `dev`: finds this process
/// in the listing's change and records its host pid.
pub(crate) fn learn(g: &Global, p: &Process, dev: usize, before: &[(u32, u64)], bytes: u64) {
    spend(p);
    let Some(after) = listing(dev) else { return };
    let taken: Vec<u32> = g
        .region
        .processes()
        .iter()
        .filter(|i| i.slot != p.slot)
        .map(|i| i.host_pid as u32)
        .collect();
    let candidates: Vec<u32> = after
        .iter()
        .filter(|&&(pid, used)| {
            let grew = match before.iter().find(|b| b.0 == pid) {
                None => true,
                Some(&(_, was)) => used >= was.saturating_add(bytes),
            };
            grew && pid != 0 && !taken.contains(&pid)
        })
        .map(|e| e.0)
        .collect();
    if let ([pid], Some(slot)) = (candidates.as_slice(), g.region.slots.get(p.slot)) {
        slot.host_pid.store(*pid as i32, Relaxed);
        p.host_pid_tries.store(0, Relaxed);
        hlog!(crate::log::INFO, "host pid {pid}");
    }
}
