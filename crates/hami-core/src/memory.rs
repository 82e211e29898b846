//! Memory limits and the container's view of device memory.
//!
//! Every allocation path follows the same order: admit the bytes in the
//! shared region (check and account in one step, for the whole container),
//! then ask the driver, then record the handle; if the driver fails, the
//! bytes are given back. Over the limit the driver is never asked and the
//! caller gets `CUDA_ERROR_OUT_OF_MEMORY`. A free first takes the handle out
//! of the process's table, then calls the driver: if the driver refuses, the
//! entry is put back; if it succeeded, the bytes are given back. (Calling the
//! driver first would let another thread get the same address from the
//! driver and record it before we remove ours: we would then un-count its
//! allocation instead of ours.) An entry that a new allocation displaces
//! (the driver freed it behind our back) is given back too. A free of an
//! unknown handle is forwarded all the same. Destroying a context
//! (`cuCtxDestroy`) or resetting a primary context
//! (`cuDevicePrimaryCtxReset`) gives back everything allocated in it.
//!
//! Devices are the container's device indices (see [`crate::device`]), not
//! CUDA ordinals.
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

use crate::device::{current_context, current_device, current_ordinal, index_of_ordinal};
use crate::ffi::*;
use crate::state::{Entry, Kind, Process, global, process};
use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::AtomicPtr;

type Ptr = *mut u64;

static MEM_GET_ADDRESS_RANGE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static MEM_ALLOC_MANAGED: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// Records an accounted handle. An entry it displaces was freed behind our
/// back (its address handed out again by the driver): its bytes are given
/// back.
fn record(p: &Process, kind: Kind, handle: u64, entry: Entry) {
    let old = p.tracker().map.insert((kind, handle), entry);
    if let Some(old) = old
        && kind != Kind::Pool
    {
        global().region.release(p.slot, old.dev, old.bytes);
    }
}

/// The device index of an allocation location that names a CUDA ordinal.
fn location_device(loc_type: c_int, loc_id: c_int) -> usize {
    if loc_type == CU_MEM_LOCATION_TYPE_DEVICE && loc_id >= 0 {
        index_of_ordinal(loc_id)
    } else {
        current_device()
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
            let ctx = current_context();
            record(p, kind, handle, Entry { dev, bytes, ctx });
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

/// A free: takes `handle` (as any of `kinds`) out of the table, calls the
/// driver, puts the entries back if it refused, else gives the bytes back
/// (a stream-ordered pool's count is brought up to date instead).
fn uncounted(kinds: &[Kind], handle: u64, free: impl FnOnce() -> CUresult) -> CUresult {
    let p = process();
    let taken: Vec<(Kind, Entry)> = {
        let mut t = p.tracker();
        kinds
            .iter()
            .filter_map(|&k| t.map.remove(&(k, handle)).map(|e| (k, e)))
            .collect()
    };
    let r = free();
    if r != CUDA_SUCCESS {
        // Not freed, so the driver cannot have handed the address out again.
        let mut t = p.tracker();
        for (k, e) in taken {
            t.map.entry((k, handle)).or_insert(e);
        }
        return r;
    }
    for (k, e) in taken {
        if k == Kind::Pool {
            reconcile_pool(e.bytes as usize);
        } else {
            global().region.release(p.slot, e.dev, e.bytes);
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
            e.bytes = actual;
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
    uncounted(&[Kind::Pool, Kind::Linear], p, || unsafe { real(p) })
}

// ---- stream-ordered pools ----------------------------------------------------

static DEVICE_GET_MEM_POOL: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static POOL_GET_ATTRIBUTE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
/// `CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`, `CU_MEMPOOL_ATTR_USED_MEM_CURRENT`.
const POOL_RESERVED: c_int = 5;
const POOL_USED: c_int = 7;

/// The current pool of CUDA device `ordinal`.
fn current_pool(ordinal: c_int) -> Option<usize> {
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
    (unsafe { f(&mut pool, ordinal) } == CUDA_SUCCESS && pool != 0).then_some(pool)
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
    // (The pool's lock-free count: concurrent reconciles of one pool may
    // each apply their own difference; both read the driver's figure.)
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
        let ctx = current_context();
        record(
            pr,
            Kind::Pool,
            ptr,
            Entry {
                dev,
                bytes: pool as u64,
                ctx,
            },
        );
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
    let ordinal = current_ordinal();
    // SAFETY: valid out pointer.
    pool_alloc(
        index_of_ordinal(ordinal),
        current_pool(ordinal),
        size,
        p,
        || unsafe { real(p, size, stream) },
    )
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
    uncounted(&[Kind::Pool, Kind::Linear], p, || unsafe {
        real(p, stream)
    })
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
    let dev = location_device(loc_type, loc_id);
    counted(Kind::Physical, dev, size as u64, || {
        // SAFETY: valid arguments.
        let r = unsafe { real(h, size, prop, flags) };
        // SAFETY: `h` is non-null; the driver wrote it on success.
        unsafe { out_on_success(r, h) }
    })
}

pub(crate) unsafe fn release(real: unsafe extern "C" fn(u64) -> CUresult, h: u64) -> CUresult {
    // SAFETY: forwarding the caller's argument.
    uncounted(&[Kind::Physical], h, || unsafe { real(h) })
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
    uncounted(&[Kind::Array], a, || unsafe { real(a) })
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
    uncounted(&[Kind::Mipmap], a, || unsafe { real(a) })
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
    let ctx = current_context();
    record(pr, Kind::Ipc, addr, Entry { dev, bytes, ctx });
    r
}

pub(crate) unsafe fn ipc_close(real: unsafe extern "C" fn(u64) -> CUresult, p: u64) -> CUresult {
    // SAFETY: forwarding the caller's argument.
    uncounted(&[Kind::Ipc], p, || unsafe { real(p) })
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
    uncounted(&[Kind::External], m, || unsafe { real(m) })
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
    let dev = location_device(loc_type, loc_id);
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
        let freed: Vec<Entry> = {
            let mut t = p.tracker();
            let ptrs = t.graphs.remove(&graph).unwrap_or_default();
            ptrs.into_iter()
                .filter_map(|d| t.map.remove(&(Kind::GraphMem, d)))
                .collect()
        };
        for e in freed {
            global().region.release(p.slot, e.dev, e.bytes);
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
        let limit = global().memory_limit(index_of_ordinal(dev));
        if limit != 0 {
            // SAFETY: non-null, written by the driver.
            unsafe { *bytes = (*bytes as u64).min(limit) as usize };
        }
    }
    r
}

// ---- contexts ------------------------------------------------------------------

/// Takes every entry allocated in `ctx` out of the table, runs `destroy`
/// (the driver frees them all), then gives their bytes back; if the driver
/// refused, the entries go back.
fn context_gone(ctx: usize, destroy: impl FnOnce() -> CUresult) -> CUresult {
    if ctx == 0 {
        return destroy();
    }
    let p = process();
    let taken: Vec<((Kind, u64), Entry)> = {
        let mut t = p.tracker();
        let keys: Vec<(Kind, u64)> = t
            .map
            .iter()
            .filter(|(_, e)| e.ctx == ctx)
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| t.map.remove(&k).map(|e| (k, e)))
            .collect()
    };
    let r = destroy();
    if r != CUDA_SUCCESS {
        let mut t = p.tracker();
        for (k, e) in taken {
            t.map.entry(k).or_insert(e);
        }
        return r;
    }
    let mut n = 0u64;
    for (k, e) in taken {
        if k.0 != Kind::Pool {
            global().region.release(p.slot, e.dev, e.bytes);
            n += e.bytes;
        }
    }
    // Pools may have given their memory back with the context.
    reconcile_all_pools();
    hlog!(
        crate::log::DEBUG,
        "context {ctx:#x} gone: {n} bytes given back"
    );
    r
}

pub(crate) unsafe fn ctx_destroy(
    real: unsafe extern "C" fn(usize) -> CUresult,
    ctx: usize,
) -> CUresult {
    // SAFETY: forwarding the caller's argument.
    context_gone(ctx, || unsafe { real(ctx) })
}

static PRIMARY_GET_STATE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static PRIMARY_RETAIN: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static PRIMARY_RELEASE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// The primary context of CUDA device `ordinal` when it is active (0 when
/// not active or unknown: then nothing of ours can be in it, or we cannot
/// tell what, and the count stays, erring high). Retaining an active
/// primary context only bumps its reference count, released at once.
fn active_primary_context(ordinal: c_int) -> usize {
    use crate::dl::{Lib, resolve};
    let (state, retain, release) = (
        resolve(
            &PRIMARY_GET_STATE,
            b"cuDevicePrimaryCtxGetState\0",
            Lib::Cuda,
        ),
        resolve(&PRIMARY_RETAIN, b"cuDevicePrimaryCtxRetain\0", Lib::Cuda),
        resolve(
            &PRIMARY_RELEASE,
            b"cuDevicePrimaryCtxRelease_v2\0",
            Lib::Cuda,
        ),
    );
    if state.is_null() || retain.is_null() || release.is_null() {
        return 0;
    }
    type State = unsafe extern "C" fn(c_int, *mut c_uint, *mut c_int) -> CUresult;
    type Retain = unsafe extern "C" fn(*mut usize, c_int) -> CUresult;
    type Release = unsafe extern "C" fn(c_int) -> CUresult;
    // SAFETY: the driver's functions of these names.
    let (state, retain, release) = unsafe {
        (
            std::mem::transmute::<*mut c_void, State>(state),
            std::mem::transmute::<*mut c_void, Retain>(retain),
            std::mem::transmute::<*mut c_void, Release>(release),
        )
    };
    let (mut flags, mut active) = (0 as c_uint, 0 as c_int);
    // SAFETY: valid out pointers.
    if unsafe { state(ordinal, &mut flags, &mut active) } != CUDA_SUCCESS || active == 0 {
        return 0;
    }
    let mut ctx = 0usize;
    // SAFETY: valid out pointer; balanced by the release below.
    if unsafe { retain(&mut ctx, ordinal) } != CUDA_SUCCESS {
        return 0;
    }
    // SAFETY: the reference we just took.
    unsafe { release(ordinal) };
    ctx
}

pub(crate) unsafe fn primary_ctx_reset(
    real: unsafe extern "C" fn(c_int) -> CUresult,
    ordinal: c_int,
) -> CUresult {
    let ctx = active_primary_context(ordinal);
    // SAFETY: forwarding the caller's argument.
    context_gone(ctx, || unsafe { real(ordinal) })
}
