//! Memory limits and the container's view of device memory.
//!
//! Every allocation path follows the same order: admit the bytes in the
//! shared region (check and account in one step, for the whole container),
//! then ask the driver, then record the handle; if the driver fails, the
//! bytes are given back. Over the limit the driver is never asked and the
//! caller gets `CUDA_ERROR_OUT_OF_MEMORY`. Frees go to the driver first and
//! are un-accounted only when it succeeded and the handle is one we counted;
//! a free of an unknown handle is forwarded all the same.
//!
//! Sizes: linear, managed, stream-ordered, VMM (`cuMemCreate`), graph
//! memory nodes and external memory are counted at the size asked for;
//! pitched allocations at `pitch x height` (admitted with the width rounded
//! up to 512 bytes, then corrected); arrays at `width x height x depth x
//! channels x element size` (mipmapped: the sum of the levels); IPC handles
//! opened from another process at the size the driver reports for the
//! mapping, after the fact. Pinned host memory (`cuMemHostAlloc`) is not
//! device memory and is not counted.
//!
//! Stream-ordered pools (`cuMemAllocAsync`, `cuMemAllocFromPoolAsync`) are
//! counted by what the pool *reserves* from the card, which is what the
//! card really holds: a pool keeps freed memory for reuse (up to its release
//! threshold) until a trim or a synchronisation gives it back. An allocation
//! is admitted for the part the pool's cached memory cannot serve
//! (`size - (reserved - used)`), and after every pool operation
//! (allocation, free, `cuMemPoolTrimTo`) the count is set to the pool's
//! `CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`. Memory a pool gives back at a
//! synchronisation is noticed at the next pool operation, at the next
//! `cuMemGetInfo`, or when an allocation would be refused (all pools are
//! reconciled and the allocation retried), so the count errs high, never
//! low.

use crate::ffi::*;
use crate::state::{Kind, global, process};
use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::AtomicPtr;

type Ptr = *mut u64;

static CTX_GET_DEVICE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static MEM_GET_ADDRESS_RANGE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static MEM_ALLOC_MANAGED: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// The current context's device ordinal, from the real driver (0 if none).
pub(crate) fn current_device() -> usize {
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
        d as usize
    } else {
        0
    }
}

/// Admits `bytes` on `dev`; when refused, first brings every pool's count
/// up to date (pools may have given memory back at a synchronisation).
fn admit(dev: usize, bytes: u64) -> bool {
    let (g, p) = (global(), process());
    p.admit(g, dev, bytes).is_ok() || (reconcile_all_pools() && p.admit(g, dev, bytes).is_ok())
}

/// Admits, calls the driver, records: the common allocation path.
/// `make` performs the real allocation and returns the handle.
fn counted(
    kind: Kind,
    dev: usize,
    bytes: u64,
    make: impl FnOnce() -> Result<u64, CUresult>,
) -> CUresult {
    let (g, p) = (global(), process());
    if !admit(dev, bytes) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let before = crate::hostpid::before(p, dev);
    match make() {
        Ok(handle) => {
            if let Some(before) = before {
                crate::hostpid::learn(g, p, dev, &before, bytes);
            }
            p.tracker().map.insert((kind, handle), (dev, bytes));
            hlog!(
                crate::log::DEBUG,
                "device {dev}: {kind:?} {handle:#x} of {bytes} bytes"
            );
            CUDA_SUCCESS
        }
        Err(e) => {
            g.region.release(p.slot, dev, bytes);
            e
        }
    }
}

/// Forwards a free; un-accounts when it succeeded and the handle was ours.
fn uncounted(kind: Kind, handle: u64, r: CUresult) -> CUresult {
    if r == CUDA_SUCCESS {
        let p = process();
        let entry = p.tracker().map.remove(&(kind, handle));
        if let Some((dev, bytes)) = entry {
            global().region.release(p.slot, dev, bytes);
        }
    }
    r
}

/// The value the driver wrote through `p`, or the driver's error.
///
/// # Safety
/// `p` is non-null and, when `r` is success, was written by the driver.
unsafe fn out_on_success(r: CUresult, p: Ptr) -> Result<u64, CUresult> {
    if r == CUDA_SUCCESS {
        // SAFETY: as the caller promised.
        Ok(unsafe { read_out(p) })
    } else {
        Err(r)
    }
}

unsafe fn read_out(p: Ptr) -> u64 {
    // SAFETY: callers checked `p` is non-null and the driver wrote it.
    unsafe { *p }
}

fn managed_fallback(p: Ptr, size: usize) -> CUresult {
    let f = crate::dl::resolve(
        &MEM_ALLOC_MANAGED,
        b"cuMemAllocManaged\0",
        crate::dl::Lib::Cuda,
    );
    if f.is_null() {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    // SAFETY: the driver's cuMemAllocManaged(CUdeviceptr*, size_t, unsigned).
    let f = unsafe {
        std::mem::transmute::<*mut c_void, unsafe extern "C" fn(Ptr, usize, c_uint) -> CUresult>(f)
    };
    // SAFETY: forwarding the caller's pointer.
    unsafe { f(p, size, CU_MEM_ATTACH_GLOBAL) }
}

pub(crate) unsafe fn alloc(
    real: unsafe extern "C" fn(Ptr, usize) -> CUresult,
    p: Ptr,
    size: usize,
) -> CUresult {
    if p.is_null() || size == 0 {
        // SAFETY: let the driver report the caller's mistake.
        return unsafe { real(p, size) };
    }
    let oversubscribe = global().env.oversubscribe;
    counted(Kind::Linear, current_device(), size as u64, || {
        // SAFETY: valid out pointer.
        let mut r = unsafe { real(p, size) };
        if r == CUDA_ERROR_OUT_OF_MEMORY && oversubscribe {
            // Within the limit but beyond the card: fall back to managed memory.
            r = managed_fallback(p, size);
        }
        // SAFETY: `p` is non-null; the driver wrote it on success.
        unsafe { out_on_success(r, p) }
    })
}

pub(crate) unsafe fn alloc_pitch(
    real: unsafe extern "C" fn(Ptr, *mut usize, usize, usize, c_uint) -> CUresult,
    p: Ptr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    elem: c_uint,
) -> CUresult {
    if p.is_null() || pitch.is_null() || width == 0 || height == 0 {
        // SAFETY: let the driver report the caller's mistake.
        return unsafe { real(p, pitch, width, height, elem) };
    }
    let dev = current_device();
    let estimate = (width.div_ceil(512) * 512) as u64 * height as u64;
    let r = counted(Kind::Linear, dev, estimate, || {
        // SAFETY: valid out pointers.
        let r = unsafe { real(p, pitch, width, height, elem) };
        // SAFETY: `p` is non-null; the driver wrote it on success.
        unsafe { out_on_success(r, p) }
    });
    if r == CUDA_SUCCESS {
        // Correct the estimate to what the driver really took.
        // SAFETY: written by the driver on success.
        let actual = unsafe { *pitch } as u64 * height as u64;
        let (g, pr) = (global(), process());
        // SAFETY: as above.
        let handle = unsafe { read_out(p) };
        if let Some(e) = pr.tracker().map.get_mut(&(Kind::Linear, handle)) {
            e.1 = actual;
        }
        if actual > estimate {
            g.region.add_used(pr.slot, dev, actual - estimate);
        } else {
            g.region.release(pr.slot, dev, estimate - actual);
        }
    }
    r
}

pub(crate) unsafe fn alloc_managed(
    real: unsafe extern "C" fn(Ptr, usize, c_uint) -> CUresult,
    p: Ptr,
    size: usize,
    flags: c_uint,
) -> CUresult {
    if p.is_null() || size == 0 {
        // SAFETY: let the driver report the caller's mistake.
        return unsafe { real(p, size, flags) };
    }
    counted(Kind::Linear, current_device(), size as u64, || {
        // SAFETY: valid out pointer.
        let r = unsafe { real(p, size, flags) };
        // SAFETY: `p` is non-null; the driver wrote it on success.
        unsafe { out_on_success(r, p) }
    })
}

pub(crate) unsafe fn free(real: unsafe extern "C" fn(u64) -> CUresult, p: u64) -> CUresult {
    // SAFETY: forwarding the caller's argument.
    let r = unsafe { real(p) };
    if r == CUDA_SUCCESS && pool_freed(p) {
        return r;
    }
    uncounted(Kind::Linear, p, r)
}

// ---- stream-ordered pools ----------------------------------------------------

static DEVICE_GET_MEM_POOL: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static POOL_GET_ATTRIBUTE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
/// `CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`, `CU_MEMPOOL_ATTR_USED_MEM_CURRENT`.
const POOL_RESERVED: c_int = 5;
const POOL_USED: c_int = 7;

/// The current pool of `dev`.
fn current_pool(dev: usize) -> Option<usize> {
    let f = crate::dl::resolve(
        &DEVICE_GET_MEM_POOL,
        b"cuDeviceGetMemPool\0",
        crate::dl::Lib::Cuda,
    );
    if f.is_null() {
        return None;
    }
    // SAFETY: the driver's cuDeviceGetMemPool(CUmemoryPool*, CUdevice).
    let f = unsafe {
        std::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut usize, c_int) -> CUresult>(f)
    };
    let mut pool = 0usize;
    // SAFETY: valid out pointer.
    (unsafe { f(&mut pool, dev as c_int) } == CUDA_SUCCESS && pool != 0).then_some(pool)
}

/// (reserved, used) bytes of a pool.
fn pool_state(pool: usize) -> Option<(u64, u64)> {
    let f = crate::dl::resolve(
        &POOL_GET_ATTRIBUTE,
        b"cuMemPoolGetAttribute\0",
        crate::dl::Lib::Cuda,
    );
    if f.is_null() {
        return None;
    }
    type F = unsafe extern "C" fn(usize, c_int, *mut u64) -> CUresult;
    // SAFETY: the driver's cuMemPoolGetAttribute; both attributes are cuuint64_t.
    let f = unsafe { std::mem::transmute::<*mut c_void, F>(f) };
    let (mut reserved, mut used) = (0u64, 0u64);
    // SAFETY: valid out pointers.
    let ok = unsafe {
        f(pool, POOL_RESERVED, &mut reserved) == CUDA_SUCCESS
            && f(pool, POOL_USED, &mut used) == CUDA_SUCCESS
    };
    ok.then_some((reserved, used))
}

/// Sets the count of `pool` to what it reserves now. Returns whether it changed.
fn reconcile_pool(pool: usize) -> bool {
    let Some((reserved, _)) = pool_state(pool) else {
        return false;
    };
    let p = process();
    let (dev, before) = {
        let mut t = p.tracker();
        let Some(e) = t.pools.get_mut(&pool) else {
            return false;
        };
        let before = e.1;
        e.1 = reserved;
        (e.0, before)
    };
    let region = &global().region;
    if reserved > before {
        region.add_used(p.slot, dev, reserved - before);
    } else {
        region.release(p.slot, dev, before - reserved);
    }
    reserved != before
}

/// Reconciles every pool this process has used. Returns whether any changed.
fn reconcile_all_pools() -> bool {
    let pools: Vec<usize> = process().tracker().pools.keys().copied().collect();
    pools
        .into_iter()
        .fold(false, |changed, pool| reconcile_pool(pool) | changed)
}

/// If `ptr` came from a pool, the pool's count is brought up to date.
fn pool_freed(ptr: u64) -> bool {
    let entry = process().tracker().map.remove(&(Kind::Pool, ptr));
    match entry {
        Some((_, pool)) => {
            reconcile_pool(pool as usize);
            true
        }
        None => false,
    }
}

/// A stream-ordered allocation of `size` from `pool` on `dev`.
fn pool_alloc(
    dev: usize,
    pool: Option<usize>,
    size: usize,
    p: Ptr,
    make: impl FnOnce() -> CUresult,
) -> CUresult {
    let Some((pool, (reserved, used))) = pool.and_then(|pl| Some((pl, pool_state(pl)?))) else {
        // No pool attributes to read: count the allocation itself.
        return counted(Kind::Linear, dev, size as u64, || {
            let r = make();
            // SAFETY: `p` is non-null; the driver wrote it on success.
            unsafe { out_on_success(r, p) }
        });
    };
    let pr = process();
    let first_sight = {
        let mut t = pr.tracker();
        let new = !t.pools.contains_key(&pool);
        t.pools.entry(pool).or_insert((dev, 0));
        new
    };
    if first_sight {
        // Whatever the pool already holds is the container's too.
        reconcile_pool(pool);
    }
    let need = (size as u64).saturating_sub(reserved.saturating_sub(used));
    if !admit(dev, need) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    if let Some(e) = pr.tracker().pools.get_mut(&pool) {
        e.1 += need;
    }
    let r = make();
    // The pool may have grown by more (granularity) or less (cache) than
    // admitted, or not at all (failure): count what it really reserves.
    reconcile_pool(pool);
    if r == CUDA_SUCCESS {
        // SAFETY: written by the driver on success.
        let ptr = unsafe { read_out(p) };
        pr.tracker()
            .map
            .insert((Kind::Pool, ptr), (dev, pool as u64));
    }
    r
}

pub(crate) unsafe fn pool_trim_to(
    real: unsafe extern "C" fn(usize, usize) -> CUresult,
    pool: usize,
    keep: usize,
) -> CUresult {
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { real(pool, keep) };
    reconcile_pool(pool);
    r
}

pub(crate) unsafe fn alloc_async(
    real: unsafe extern "C" fn(Ptr, usize, usize) -> CUresult,
    p: Ptr,
    size: usize,
    stream: usize,
) -> CUresult {
    if p.is_null() || size == 0 {
        // SAFETY: let the driver report the caller's mistake.
        return unsafe { real(p, size, stream) };
    }
    let dev = current_device();
    // SAFETY: valid out pointer.
    pool_alloc(dev, current_pool(dev), size, p, || unsafe {
        real(p, size, stream)
    })
}

pub(crate) unsafe fn alloc_from_pool_async(
    real: unsafe extern "C" fn(Ptr, usize, usize, usize) -> CUresult,
    p: Ptr,
    size: usize,
    pool: usize,
    stream: usize,
) -> CUresult {
    if p.is_null() || size == 0 || pool == 0 {
        // SAFETY: let the driver report the caller's mistake.
        return unsafe { real(p, size, pool, stream) };
    }
    // SAFETY: valid out pointer.
    pool_alloc(current_device(), Some(pool), size, p, || unsafe {
        real(p, size, pool, stream)
    })
}

pub(crate) unsafe fn free_async(
    real: unsafe extern "C" fn(u64, usize) -> CUresult,
    p: u64,
    stream: usize,
) -> CUresult {
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { real(p, stream) };
    if r == CUDA_SUCCESS && pool_freed(p) {
        return r;
    }
    uncounted(Kind::Linear, p, r)
}

pub(crate) unsafe fn create(
    real: unsafe extern "C" fn(Ptr, usize, *const MemAllocationProp, u64) -> CUresult,
    h: Ptr,
    size: usize,
    prop: *const MemAllocationProp,
    flags: u64,
) -> CUresult {
    if h.is_null() || prop.is_null() || size == 0 {
        // SAFETY: let the driver report the caller's mistake.
        return unsafe { real(h, size, prop, flags) };
    }
    // SAFETY: non-null, caller-owned.
    let (loc_type, loc_id) = unsafe { ((*prop).location_type, (*prop).location_id) };
    let dev = if loc_type == CU_MEM_LOCATION_TYPE_DEVICE && loc_id >= 0 {
        loc_id as usize
    } else {
        current_device()
    };
    counted(Kind::Physical, dev, size as u64, || {
        // SAFETY: valid arguments.
        let r = unsafe { real(h, size, prop, flags) };
        // SAFETY: `h` is non-null; the driver wrote it on success.
        unsafe { out_on_success(r, h) }
    })
}

pub(crate) unsafe fn release(real: unsafe extern "C" fn(u64) -> CUresult, h: u64) -> CUresult {
    // SAFETY: forwarding the caller's argument.
    uncounted(Kind::Physical, h, unsafe { real(h) })
}

fn array_bytes(w: usize, h: usize, d: usize, channels: u32, format: u32) -> u64 {
    (w as u64)
        .saturating_mul(h.max(1) as u64)
        .saturating_mul(d.max(1) as u64)
        .saturating_mul(channels as u64)
        .saturating_mul(array_format_bytes(format))
}

pub(crate) unsafe fn array_create(
    real: unsafe extern "C" fn(Ptr, *const ArrayDescriptor) -> CUresult,
    a: Ptr,
    d: *const ArrayDescriptor,
) -> CUresult {
    if a.is_null() || d.is_null() {
        // SAFETY: let the driver report the caller's mistake.
        return unsafe { real(a, d) };
    }
    // SAFETY: non-null, caller-owned.
    let desc = unsafe { &*d };
    let bytes = array_bytes(desc.width, desc.height, 1, desc.num_channels, desc.format);
    counted(Kind::Array, current_device(), bytes, || {
        // SAFETY: valid arguments.
        let r = unsafe { real(a, d) };
        // SAFETY: `a` is non-null; the driver wrote it on success.
        unsafe { out_on_success(r, a) }
    })
}

pub(crate) unsafe fn array3d_create(
    real: unsafe extern "C" fn(Ptr, *const Array3dDescriptor) -> CUresult,
    a: Ptr,
    d: *const Array3dDescriptor,
) -> CUresult {
    if a.is_null() || d.is_null() {
        // SAFETY: let the driver report the caller's mistake.
        return unsafe { real(a, d) };
    }
    // SAFETY: non-null, caller-owned.
    let desc = unsafe { &*d };
    let bytes = array_bytes(
        desc.width,
        desc.height,
        desc.depth,
        desc.num_channels,
        desc.format,
    );
    counted(Kind::Array, current_device(), bytes, || {
        // SAFETY: valid arguments.
        let r = unsafe { real(a, d) };
        // SAFETY: `a` is non-null; the driver wrote it on success.
        unsafe { out_on_success(r, a) }
    })
}

pub(crate) unsafe fn array_destroy(
    real: unsafe extern "C" fn(u64) -> CUresult,
    a: u64,
) -> CUresult {
    // SAFETY: forwarding the caller's argument.
    uncounted(Kind::Array, a, unsafe { real(a) })
}

pub(crate) unsafe fn mipmap_create(
    real: unsafe extern "C" fn(Ptr, *const Array3dDescriptor, c_uint) -> CUresult,
    a: Ptr,
    d: *const Array3dDescriptor,
    levels: c_uint,
) -> CUresult {
    if a.is_null() || d.is_null() {
        // SAFETY: let the driver report the caller's mistake.
        return unsafe { real(a, d, levels) };
    }
    // SAFETY: non-null, caller-owned.
    let desc = unsafe { &*d };
    let (mut w, mut h, mut z) = (desc.width.max(1), desc.height.max(1), desc.depth.max(1));
    let mut bytes = 0u64;
    for _ in 0..levels.clamp(1, 64) {
        bytes = bytes.saturating_add(array_bytes(w, h, z, desc.num_channels, desc.format));
        (w, h, z) = ((w / 2).max(1), (h / 2).max(1), (z / 2).max(1));
    }
    counted(Kind::Mipmap, current_device(), bytes, || {
        // SAFETY: valid arguments.
        let r = unsafe { real(a, d, levels) };
        // SAFETY: `a` is non-null; the driver wrote it on success.
        unsafe { out_on_success(r, a) }
    })
}

pub(crate) unsafe fn mipmap_destroy(
    real: unsafe extern "C" fn(u64) -> CUresult,
    a: u64,
) -> CUresult {
    // SAFETY: forwarding the caller's argument.
    uncounted(Kind::Mipmap, a, unsafe { real(a) })
}

/// Size of the mapping that contains `p`, as the driver reports it.
fn mapping_size(p: u64) -> Option<u64> {
    let f = crate::dl::resolve(
        &MEM_GET_ADDRESS_RANGE,
        b"cuMemGetAddressRange_v2\0",
        crate::dl::Lib::Cuda,
    );
    if f.is_null() {
        return None;
    }
    type F = unsafe extern "C" fn(*mut u64, *mut usize, u64) -> CUresult;
    // SAFETY: the driver's cuMemGetAddressRange_v2.
    let f = unsafe { std::mem::transmute::<*mut c_void, F>(f) };
    let (mut base, mut size) = (0u64, 0usize);
    // SAFETY: valid out pointers.
    (unsafe { f(&mut base, &mut size, p) } == CUDA_SUCCESS).then_some(size as u64)
}

pub(crate) unsafe fn ipc_open(
    real: unsafe extern "C" fn(Ptr, IpcMemHandle, c_uint) -> CUresult,
    p: Ptr,
    h: IpcMemHandle,
    flags: c_uint,
) -> CUresult {
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { real(p, h, flags) };
    if r != CUDA_SUCCESS || p.is_null() {
        return r;
    }
    // The size is only known once mapped: count it now, and undo the
    // mapping if it takes the container over its limit.
    // SAFETY: written by the driver on success.
    let addr = unsafe { read_out(p) };
    let Some(bytes) = mapping_size(addr) else {
        return r;
    };
    let (g, pr, dev) = (global(), process(), current_device());
    if pr.admit(g, dev, bytes).is_err() {
        static CLOSE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
        let f = crate::dl::resolve(&CLOSE, b"cuIpcCloseMemHandle\0", crate::dl::Lib::Cuda);
        if !f.is_null() {
            // SAFETY: the driver's cuIpcCloseMemHandle(CUdeviceptr).
            let f = unsafe {
                std::mem::transmute::<*mut c_void, unsafe extern "C" fn(u64) -> CUresult>(f)
            };
            // SAFETY: closing the mapping we just opened.
            unsafe { f(addr) };
        }
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    pr.tracker().map.insert((Kind::Ipc, addr), (dev, bytes));
    r
}

pub(crate) unsafe fn ipc_close(real: unsafe extern "C" fn(u64) -> CUresult, p: u64) -> CUresult {
    // SAFETY: forwarding the caller's argument.
    uncounted(Kind::Ipc, p, unsafe { real(p) })
}

pub(crate) unsafe fn import_external(
    real: unsafe extern "C" fn(Ptr, *const ExternalMemoryHandleDesc) -> CUresult,
    m: Ptr,
    d: *const ExternalMemoryHandleDesc,
) -> CUresult {
    if m.is_null() || d.is_null() {
        // SAFETY: let the driver report the caller's mistake.
        return unsafe { real(m, d) };
    }
    // SAFETY: non-null, caller-owned.
    let bytes = unsafe { (*d).size };
    counted(Kind::External, current_device(), bytes, || {
        // SAFETY: valid arguments.
        let r = unsafe { real(m, d) };
        // SAFETY: `m` is non-null; the driver wrote it on success.
        unsafe { out_on_success(r, m) }
    })
}

pub(crate) unsafe fn destroy_external(
    real: unsafe extern "C" fn(u64) -> CUresult,
    m: u64,
) -> CUresult {
    // SAFETY: forwarding the caller's argument.
    uncounted(Kind::External, m, unsafe { real(m) })
}

/// Graph memory nodes are counted when added (the memory is reserved for
/// the graph's launches) and given back when the graph is destroyed.
pub(crate) unsafe fn graph_add_mem_alloc_node(
    real: unsafe extern "C" fn(
        Ptr,
        usize,
        *const usize,
        usize,
        *mut MemAllocNodeParams,
    ) -> CUresult,
    node: Ptr,
    graph: usize,
    deps: *const usize,
    n: usize,
    params: *mut MemAllocNodeParams,
) -> CUresult {
    if node.is_null() || params.is_null() {
        // SAFETY: let the driver report the caller's mistake.
        return unsafe { real(node, graph, deps, n, params) };
    }
    // SAFETY: non-null, caller-owned.
    let (bytes, loc_type, loc_id) = unsafe {
        (
            (*params).bytesize as u64,
            (*params).location_type,
            (*params).location_id,
        )
    };
    let dev = if loc_type == CU_MEM_LOCATION_TYPE_DEVICE && loc_id >= 0 {
        loc_id as usize
    } else {
        current_device()
    };
    let r = counted(Kind::GraphMem, dev, bytes, || {
        // SAFETY: valid arguments.
        let r = unsafe { real(node, graph, deps, n, params) };
        // SAFETY: the driver wrote dptr on success.
        if r == CUDA_SUCCESS {
            Ok(unsafe { (*params).dptr })
        } else {
            Err(r)
        }
    });
    if r == CUDA_SUCCESS {
        // SAFETY: as above.
        let dptr = unsafe { (*params).dptr };
        process()
            .tracker()
            .graphs
            .entry(graph)
            .or_default()
            .push(dptr);
    }
    r
}

pub(crate) unsafe fn graph_destroy(
    real: unsafe extern "C" fn(usize) -> CUresult,
    graph: usize,
) -> CUresult {
    // SAFETY: forwarding the caller's argument.
    let r = unsafe { real(graph) };
    if r == CUDA_SUCCESS {
        let p = process();
        let freed: Vec<(usize, u64)> = {
            let mut t = p.tracker();
            let ptrs = t.graphs.remove(&graph).unwrap_or_default();
            ptrs.into_iter()
                .filter_map(|d| t.map.remove(&(Kind::GraphMem, d)))
                .collect()
        };
        for (dev, bytes) in freed {
            global().region.release(p.slot, dev, bytes);
        }
    }
    r
}

/// `cuMemGetInfo`: total = the limit, free = what is left of it (never more
/// than the card really has free).
pub(crate) unsafe fn get_info(
    real: unsafe extern "C" fn(*mut usize, *mut usize) -> CUresult,
    free: *mut usize,
    total: *mut usize,
) -> CUresult {
    // SAFETY: forwarding the caller's pointers.
    let r = unsafe { real(free, total) };
    if r != CUDA_SUCCESS || free.is_null() || total.is_null() {
        return r;
    }
    let (g, p, dev) = (global(), process(), current_device());
    let limit = g.memory_limit(dev);
    if limit != 0 {
        p.reclaim_now_and_then(g);
        reconcile_all_pools();
        let used = g.region.device_used(dev);
        // SAFETY: non-null, written by the driver.
        unsafe {
            let real_free = *free as u64;
            *total = limit.min(usize::MAX as u64) as usize;
            *free = limit.saturating_sub(used).min(real_free) as usize;
        }
    }
    r
}

pub(crate) unsafe fn total_mem(
    real: unsafe extern "C" fn(*mut usize, c_int) -> CUresult,
    bytes: *mut usize,
    dev: c_int,
) -> CUresult {
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { real(bytes, dev) };
    if r == CUDA_SUCCESS && !bytes.is_null() && dev >= 0 {
        let limit = global().memory_limit(dev as usize);
        if limit != 0 {
            // SAFETY: non-null, written by the driver.
            unsafe { *bytes = (*bytes as u64).min(limit) as usize };
        }
    }
    r
}
