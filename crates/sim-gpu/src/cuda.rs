//! The simulated CUDA driver API. Signatures follow the driver's `cuda.h`;
//! only what the interposer and its tests use is here.

use crate::state::{CURRENT, Kind, current_device, now_ns, sleep_until, state};
use std::ffi::{c_char, c_int, c_uint, c_void};

pub(crate) type CUresult = c_int;
pub(crate) const SUCCESS: CUresult = 0;
pub(crate) const INVALID_VALUE: CUresult = 1;
pub(crate) const OUT_OF_MEMORY: CUresult = 2;
pub(crate) const INVALID_DEVICE: CUresult = 101;
pub(crate) const INVALID_HANDLE: CUresult = 400;
pub(crate) const NOT_FOUND: CUresult = 500;
pub(crate) const NOT_READY: CUresult = 600;

/// Driver version reported: CUDA 12.4.
pub(crate) const DRIVER_VERSION: c_int = 12040;
const CTX_BASE: usize = 0xC000;
/// Occupancy of one graph launch.
const GRAPH_LAUNCH_NS: u64 = 1_000_000;

unsafe fn out<T>(p: *mut T, v: T) -> CUresult {
    if p.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: non-null pointer to caller-owned storage, per the API contract.
    unsafe { p.write(v) };
    SUCCESS
}

fn copy_str(dst: *mut c_char, len: c_int, s: &str) -> CUresult {
    if dst.is_null() || len <= 0 {
        return INVALID_VALUE;
    }
    let n = s.len().min(len as usize - 1);
    // SAFETY: dst has room for len bytes per the API contract.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), dst.cast(), n);
        *dst.add(n) = 0;
    }
    SUCCESS
}

/// Whether CUDA ordinal `dev` is a device CUDA shows.
fn device_ok(dev: c_int) -> bool {
    state().internal(dev).is_some()
}

#[unsafe(no_mangle)]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    drop(state());
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    // SAFETY: forwarded caller pointer.
    unsafe { out(v, DRIVER_VERSION) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(n: *mut c_int) -> CUresult {
    let count = state().visible.len() as c_int;
    // SAFETY: forwarded caller pointer.
    unsafe { out(n, count) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(d: *mut c_int, ordinal: c_int) -> CUresult {
    if !device_ok(ordinal) {
        return INVALID_DEVICE;
    }
    // SAFETY: forwarded caller pointer.
    unsafe { out(d, ordinal) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: c_int) -> CUresult {
    let s = state();
    match s.internal(dev).map(|i| &s.devices[i]) {
        Some(d) => copy_str(name, len, &d.spec.name),
        None => INVALID_DEVICE,
    }
}

/// `0000:<bus>:00.0`: the card NVML shows at that address.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetPCIBusId(id: *mut c_char, len: c_int, dev: c_int) -> CUresult {
    let Some(i) = state().internal(dev) else {
        return INVALID_DEVICE;
    };
    copy_str(
        id,
        len,
        &format!("0000:{:02X}:00.0", crate::nvml::pci_bus(i)),
    )
}

fn uuid_bytes(text: &str) -> [u8; 16] {
    let hex: Vec<u8> = text
        .trim_start_matches("GPU-")
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .collect();
    std::array::from_fn(|i| {
        let h = |j: usize| {
            hex.get(j)
                .map_or(0, |c| (*c as char).to_digit(16).unwrap_or(0) as u8)
        };
        (h(2 * i) << 4) | h(2 * i + 1)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut [u8; 16], dev: c_int) -> CUresult {
    let s = state();
    match s.internal(dev).map(|i| &s.devices[i]) {
        // SAFETY: forwarded caller pointer.
        Some(d) => unsafe { out(uuid, uuid_bytes(&d.spec.uuid)) },
        None => INVALID_DEVICE,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut [u8; 16], dev: c_int) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuDeviceGetUuid(uuid, dev) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: c_int) -> CUresult {
    let s = state();
    match s.internal(dev).map(|i| &s.devices[i]) {
        // SAFETY: forwarded caller pointer.
        Some(d) => unsafe { out(bytes, d.spec.memory as usize) },
        None => INVALID_DEVICE,
    }
}

/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
const ATTR_SM_COUNT: c_int = 16;
/// `CU_DEVICE_ATTRIBUTE_PCI_BUS_ID`, `_PCI_DEVICE_ID`, `_PCI_DOMAIN_ID`.
const ATTR_PCI_BUS: c_int = 33;
const ATTR_PCI_DEVICE: c_int = 34;
const ATTR_PCI_DOMAIN: c_int = 50;
/// `CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR` / `_MINOR`.
const ATTR_CC_MAJOR: c_int = 75;
const ATTR_CC_MINOR: c_int = 76;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(v: *mut c_int, attr: c_int, dev: c_int) -> CUresult {
    let s = state();
    let Some(d) = s.internal(dev).map(|i| &s.devices[i]) else {
        return INVALID_DEVICE;
    };
    let value = match attr {
        ATTR_SM_COUNT => d.spec.sms as c_int,
        // The card NVML shows at the same PCI address (`nvml.rs`).
        ATTR_PCI_BUS => crate::nvml::pci_bus(s.internal(dev).unwrap_or(0)) as c_int,
        ATTR_PCI_DEVICE | ATTR_PCI_DOMAIN => 0,
        ATTR_CC_MAJOR => d.spec.compute_capability().0 as c_int,
        ATTR_CC_MINOR => d.spec.compute_capability().1 as c_int,
        _ => 0,
    };
    // SAFETY: forwarded caller pointer.
    unsafe { out(v, value) }
}

// Contexts: one per device (`CTX_BASE + device index`); `cuCtxCreate`
// hands out the same one as the primary context. Destroying or resetting
// it frees everything allocated on the device, as the real driver does.

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut usize, dev: c_int) -> CUresult {
    let Some(i) = state().internal(dev) else {
        return INVALID_DEVICE;
    };
    // SAFETY: forwarded caller pointer.
    unsafe { out(ctx, CTX_BASE + i) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(_dev: c_int) -> CUresult {
    SUCCESS
}

/// Always active (the simulation keeps every device's context).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDevicePrimaryCtxGetState(
    dev: c_int,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    if !device_ok(dev) {
        return INVALID_DEVICE;
    }
    // SAFETY: forwarded caller pointers.
    unsafe {
        if out(flags, 0) != SUCCESS || out(active, 1) != SUCCESS {
            return INVALID_VALUE;
        }
    }
    SUCCESS
}

fn primary_ctx_reset(dev: c_int) -> CUresult {
    let mut s = state();
    let Some(i) = s.internal(dev) else {
        return INVALID_DEVICE;
    };
    s.destroy_context(i);
    SUCCESS
}
#[unsafe(no_mangle)]
pub extern "C" fn cuDevicePrimaryCtxReset(dev: c_int) -> CUresult {
    primary_ctx_reset(dev)
}
#[unsafe(no_mangle)]
pub extern "C" fn cuDevicePrimaryCtxReset_v2(dev: c_int) -> CUresult {
    primary_ctx_reset(dev)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxCreate_v2(ctx: *mut usize, _flags: c_uint, dev: c_int) -> CUresult {
    let Some(i) = state().internal(dev) else {
        return INVALID_DEVICE;
    };
    CURRENT.with(|c| c.set(i));
    // SAFETY: forwarded caller pointer.
    unsafe { out(ctx, CTX_BASE + i) }
}

fn ctx_destroy(ctx: usize) -> CUresult {
    let mut s = state();
    let dev = ctx.wrapping_sub(CTX_BASE);
    if !s.visible.contains(&dev) {
        return INVALID_VALUE;
    }
    s.destroy_context(dev);
    SUCCESS
}
#[unsafe(no_mangle)]
pub extern "C" fn cuCtxDestroy(ctx: usize) -> CUresult {
    ctx_destroy(ctx)
}
#[unsafe(no_mangle)]
pub extern "C" fn cuCtxDestroy_v2(ctx: usize) -> CUresult {
    ctx_destroy(ctx)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSetCurrent(ctx: usize) -> CUresult {
    if ctx == 0 {
        return SUCCESS;
    }
    let dev = ctx.wrapping_sub(CTX_BASE);
    if !state().visible.contains(&dev) {
        return INVALID_VALUE;
    }
    CURRENT.with(|c| c.set(dev));
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut usize) -> CUresult {
    // SAFETY: forwarded caller pointer.
    unsafe { out(ctx, CTX_BASE + current_device()) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuCtxGetDevice(dev: *mut c_int) -> CUresult {
    let ordinal = state().ordinal(current_device());
    // SAFETY: forwarded caller pointer.
    unsafe { out(dev, ordinal) }
}

/// Polls (1 ms) while `blocked` says work waits for a flag that another
/// thread's launch will set.
fn while_blocked(blocked: impl Fn(&crate::state::State) -> bool) {
    while blocked(&state()) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    let dev = current_device();
    while_blocked(|s| s.any_blocked(dev));
    let t = state().devices.get(dev).map_or(0, |d| d.busy_until);
    sleep_until(t);
    state().settle_pools();
    SUCCESS
}

// ---- memory -------------------------------------------------------------

fn alloc_into(p: *mut u64, dev: usize, size: u64, kind: Kind) -> CUresult {
    if p.is_null() || size == 0 {
        return INVALID_VALUE;
    }
    match state().take(dev, size, kind) {
        // SAFETY: checked non-null.
        Some(a) => unsafe { out(p, a) },
        None => OUT_OF_MEMORY,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemAlloc_v2(p: *mut u64, size: usize) -> CUresult {
    alloc_into(p, current_device(), size as u64, Kind::Linear)
}

/// A pretend future entry point (CUDA "13.0"), so tests can check that the
/// interposer never hands a hook for a version it does not know.
#[unsafe(no_mangle)]
pub extern "C" fn cuMemAlloc_v3(p: *mut u64, size: usize) -> CUresult {
    // Its own body (the linker would fold an identical copy of
    // cuMemAlloc_v2 into the same address): sizes round up to 2 MiB pages.
    alloc_into(
        p,
        current_device(),
        (size as u64).div_ceil(2 << 20) * (2 << 20),
        Kind::Linear,
    )
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemAllocPitch_v2(
    p: *mut u64,
    pitch: *mut usize,
    width: usize,
    height: usize,
    _elem: c_uint,
) -> CUresult {
    if pitch.is_null() {
        return INVALID_VALUE;
    }
    let pt = width.div_ceil(512) * 512;
    let r = alloc_into(p, current_device(), (pt * height) as u64, Kind::Linear);
    if r == SUCCESS {
        // SAFETY: checked non-null.
        unsafe { *pitch = pt };
    }
    r
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemAllocManaged(p: *mut u64, size: usize, _flags: c_uint) -> CUresult {
    alloc_into(p, current_device(), size as u64, Kind::Managed)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemFree_v2(p: u64) -> CUresult {
    if state().give_back(p, &[Kind::Linear, Kind::Managed, Kind::Async]) {
        SUCCESS
    } else {
        INVALID_VALUE
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    let s = state();
    let Some(d) = s.devices.get(current_device()) else {
        return INVALID_DEVICE;
    };
    if free.is_null() || total.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: checked non-null.
    unsafe {
        *free = d.spec.memory.saturating_sub(d.card_used()) as usize;
        *total = d.spec.memory as usize;
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetAddressRange_v2(
    base: *mut u64,
    size: *mut usize,
    p: u64,
) -> CUresult {
    let s = state();
    let Some((&a, al)) = s
        .allocs
        .range(..=p)
        .next_back()
        .filter(|(a, al)| p < *a + al.size)
    else {
        return NOT_FOUND;
    };
    // SAFETY: optional caller pointers, written when non-null.
    unsafe {
        if !base.is_null() {
            *base = a;
        }
        if !size.is_null() {
            *size = al.size as usize;
        }
    }
    SUCCESS
}

fn stream_device(stream: u64) -> usize {
    if stream == 0 {
        return current_device();
    }
    state()
        .streams
        .get(&stream)
        .map_or(current_device(), |s| s.0)
}

const POOL_BASE: u64 = 0xB000;

fn pool_alloc(p: *mut u64, dev: usize, size: usize) -> CUresult {
    if p.is_null() || size == 0 {
        return INVALID_VALUE;
    }
    match state().pool_take(dev, size as u64) {
        // SAFETY: checked non-null.
        Some(a) => unsafe { out(p, a) },
        None => OUT_OF_MEMORY,
    }
}
fn mem_alloc_async(p: *mut u64, size: usize, stream: u64) -> CUresult {
    pool_alloc(p, stream_device(stream), size)
}
fn mem_free_async(p: u64, _stream: u64) -> CUresult {
    if state().give_back(p, &[Kind::Async, Kind::Linear]) {
        SUCCESS
    } else {
        INVALID_VALUE
    }
}
fn pool_device(pool: u64) -> Option<usize> {
    let d = pool.checked_sub(POOL_BASE)? as usize;
    (d < state().devices.len()).then_some(d)
}
fn mem_alloc_from_pool_async(p: *mut u64, size: usize, pool: u64, _stream: u64) -> CUresult {
    match pool_device(pool) {
        Some(dev) => pool_alloc(p, dev, size),
        None => INVALID_VALUE,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemAllocAsync(p: *mut u64, size: usize, stream: u64) -> CUresult {
    mem_alloc_async(p, size, stream)
}
#[unsafe(no_mangle)]
pub extern "C" fn cuMemAllocAsync_ptsz(p: *mut u64, size: usize, stream: u64) -> CUresult {
    mem_alloc_async(p, size, stream)
}
#[unsafe(no_mangle)]
pub extern "C" fn cuMemFreeAsync(p: u64, stream: u64) -> CUresult {
    mem_free_async(p, stream)
}
#[unsafe(no_mangle)]
pub extern "C" fn cuMemFreeAsync_ptsz(p: u64, stream: u64) -> CUresult {
    mem_free_async(p, stream)
}
#[unsafe(no_mangle)]
pub extern "C" fn cuMemAllocFromPoolAsync(
    p: *mut u64,
    size: usize,
    pool: u64,
    stream: u64,
) -> CUresult {
    mem_alloc_from_pool_async(p, size, pool, stream)
}
#[unsafe(no_mangle)]
pub extern "C" fn cuMemAllocFromPoolAsync_ptsz(
    p: *mut u64,
    size: usize,
    pool: u64,
    stream: u64,
) -> CUresult {
    mem_alloc_from_pool_async(p, size, pool, stream)
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(pool: *mut u64, dev: c_int) -> CUresult {
    let Some(i) = state().internal(dev) else {
        return INVALID_DEVICE;
    };
    // SAFETY: forwarded caller pointer.
    unsafe { out(pool, POOL_BASE + i as u64) }
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetMemPool(pool: *mut u64, dev: c_int) -> CUresult {
    // SAFETY: same contract; the current pool is always the default one.
    unsafe { cuDeviceGetDefaultMemPool(pool, dev) }
}
#[unsafe(no_mangle)]
pub extern "C" fn cuMemPoolTrimTo(pool: u64, keep: usize) -> CUresult {
    match pool_device(pool) {
        Some(dev) => {
            state().pool_trim(dev, keep as u64);
            SUCCESS
        }
        None => INVALID_VALUE,
    }
}

/// `CUmemPool_attribute` values used here.
const POOL_ATTR_RELEASE_THRESHOLD: c_int = 4;
const POOL_ATTR_RESERVED_MEM_CURRENT: c_int = 5;
const POOL_ATTR_USED_MEM_CURRENT: c_int = 7;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPoolGetAttribute(
    pool: u64,
    attr: c_int,
    value: *mut u64,
) -> CUresult {
    let Some(dev) = pool_device(pool) else {
        return INVALID_VALUE;
    };
    let s = state();
    let p = &s.devices[dev].pool;
    let v = match attr {
        POOL_ATTR_RELEASE_THRESHOLD => p.threshold,
        POOL_ATTR_RESERVED_MEM_CURRENT => p.reserved,
        POOL_ATTR_USED_MEM_CURRENT => p.used,
        _ => return INVALID_VALUE,
    };
    // SAFETY: forwarded caller pointer.
    unsafe { out(value, v) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPoolSetAttribute(
    pool: u64,
    attr: c_int,
    value: *const u64,
) -> CUresult {
    let Some(dev) = pool_device(pool) else {
        return INVALID_VALUE;
    };
    if attr != POOL_ATTR_RELEASE_THRESHOLD || value.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: checked non-null.
    state().devices[dev].pool.threshold = unsafe { *value };
    SUCCESS
}

/// `CUmemAllocationProp`: type, requestedHandleTypes, location {type, id}, ...
#[repr(C)]
pub(crate) struct MemAllocationProp {
    pub kind: c_int,
    pub handle_types: c_int,
    pub location_type: c_int,
    pub location_id: c_int,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut u64,
    size: usize,
    prop: *const MemAllocationProp,
    _flags: u64,
) -> CUresult {
    if prop.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: non-null, caller-owned.
    let Some(dev) = state().internal(unsafe { (*prop).location_id }) else {
        return INVALID_DEVICE;
    };
    alloc_into(handle, dev, size as u64, Kind::Physical)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMemRelease(handle: u64) -> CUresult {
    if state().give_back(handle, &[Kind::Physical]) {
        SUCCESS
    } else {
        INVALID_VALUE
    }
}

/// `CUDA_ARRAY_DESCRIPTOR`.
#[repr(C)]
pub(crate) struct ArrayDesc {
    pub width: usize,
    pub height: usize,
    pub format: c_uint,
    pub channels: c_uint,
}

/// `CUDA_ARRAY3D_DESCRIPTOR`.
#[repr(C)]
pub(crate) struct Array3dDesc {
    pub width: usize,
    pub height: usize,
    pub depth: usize,
    pub format: c_uint,
    pub channels: c_uint,
    pub flags: c_uint,
}

/// Bytes per element of a `CUarray_format` value.
pub(crate) fn format_bytes(format: c_uint) -> u64 {
    match format {
        0x01 | 0x08 => 1,        // UNSIGNED_INT8, SIGNED_INT8
        0x02 | 0x09 | 0x10 => 2, // (U)INT16, HALF
        _ => 4,                  // 32-bit ints, FLOAT, and anything newer
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArrayCreate_v2(arr: *mut u64, d: *const ArrayDesc) -> CUresult {
    if d.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: non-null, caller-owned.
    let d = unsafe { &*d };
    let size = d.width as u64 * d.height.max(1) as u64 * d.channels as u64 * format_bytes(d.format);
    alloc_into(arr, current_device(), size, Kind::Array)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArray3DCreate_v2(arr: *mut u64, d: *const Array3dDesc) -> CUresult {
    if d.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: non-null, caller-owned.
    let d = unsafe { &*d };
    let size = d.width as u64
        * d.height.max(1) as u64
        * d.depth.max(1) as u64
        * d.channels as u64
        * format_bytes(d.format);
    alloc_into(arr, current_device(), size, Kind::Array)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuArrayDestroy(arr: u64) -> CUresult {
    if state().give_back(arr, &[Kind::Array]) {
        SUCCESS
    } else {
        INVALID_HANDLE
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMipmappedArrayCreate(
    arr: *mut u64,
    d: *const Array3dDesc,
    levels: c_uint,
) -> CUresult {
    if d.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: non-null, caller-owned.
    let d = unsafe { &*d };
    let (mut w, mut h, mut z) = (
        d.width as u64,
        d.height.max(1) as u64,
        d.depth.max(1) as u64,
    );
    let mut size = 0;
    for _ in 0..levels.max(1) {
        size += w * h * z * d.channels as u64 * format_bytes(d.format);
        (w, h, z) = ((w / 2).max(1), (h / 2).max(1), (z / 2).max(1));
    }
    alloc_into(arr, current_device(), size, Kind::Mipmap)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuMipmappedArrayDestroy(arr: u64) -> CUresult {
    if state().give_back(arr, &[Kind::Mipmap]) {
        SUCCESS
    } else {
        INVALID_HANDLE
    }
}

/// `CUipcMemHandle`: 64 opaque bytes; the simulation stores the size first.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IpcMemHandle(pub [u8; 64]);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuIpcGetMemHandle(h: *mut IpcMemHandle, p: u64) -> CUresult {
    let size = match state().allocs.get(&p) {
        Some(a) => a.size,
        None => return INVALID_VALUE,
    };
    let mut b = [0u8; 64];
    b[..8].copy_from_slice(&size.to_le_bytes());
    b[8..16].copy_from_slice(&p.to_le_bytes());
    // SAFETY: forwarded caller pointer.
    unsafe { out(h, IpcMemHandle(b)) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuIpcOpenMemHandle_v2(p: *mut u64, h: IpcMemHandle, _flags: c_uint) -> CUresult {
    let size = u64::from_le_bytes(h.0[..8].try_into().expect("8 bytes"));
    alloc_into(p, current_device(), size, Kind::IpcMapping)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuIpcCloseMemHandle(p: u64) -> CUresult {
    if state().give_back(p, &[Kind::IpcMapping]) {
        SUCCESS
    } else {
        INVALID_VALUE
    }
}

/// `CUDA_EXTERNAL_MEMORY_HANDLE_DESC`: type, handle union (16 bytes), size, flags.
#[repr(C)]
pub(crate) struct ExternalMemoryDesc {
    pub kind: c_int,
    pub handle: [u64; 2],
    pub size: u64,
    pub flags: c_uint,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuImportExternalMemory(
    m: *mut u64,
    d: *const ExternalMemoryDesc,
) -> CUresult {
    if d.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: non-null, caller-owned.
    let size = unsafe { (*d).size };
    alloc_into(m, current_device(), size, Kind::External)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuDestroyExternalMemory(m: u64) -> CUresult {
    if state().give_back(m, &[Kind::External]) {
        SUCCESS
    } else {
        INVALID_HANDLE
    }
}

// ---- graphs ---------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphCreate(g: *mut u64, _flags: c_uint) -> CUresult {
    let mut s = state();
    let h = s.new_handle();
    s.graphs.insert(h, Vec::new());
    // SAFETY: forwarded caller pointer.
    unsafe { out(g, h) }
}

/// `CUDA_MEM_ALLOC_NODE_PARAMS`: poolProps (`CUmemPoolProps`, 88 bytes,
/// location at offset 8), accessDescs, accessDescCount, bytesize, dptr.
#[repr(C)]
pub(crate) struct MemAllocNodeParams {
    pub pool_kind: c_int,
    pub pool_handle_types: c_int,
    pub location_type: c_int,
    pub location_id: c_int,
    pub pool_rest: [u8; 72],
    pub access_descs: *const c_void,
    pub access_desc_count: usize,
    pub bytesize: usize,
    pub dptr: u64,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphAddMemAllocNode(
    node: *mut u64,
    graph: u64,
    _deps: *const u64,
    _ndeps: usize,
    params: *mut MemAllocNodeParams,
) -> CUresult {
    if node.is_null() || params.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: non-null, caller-owned.
    let prm = unsafe { &mut *params };
    let mut s = state();
    if !s.graphs.contains_key(&graph) {
        return INVALID_HANDLE;
    }
    let Some(dev) = s.internal(prm.location_id) else {
        return INVALID_DEVICE;
    };
    let Some(a) = s.take(dev, prm.bytesize as u64, Kind::GraphMem) else {
        return OUT_OF_MEMORY;
    };
    s.graphs.get_mut(&graph).expect("checked").push(a);
    prm.dptr = a;
    let h = s.new_handle();
    // SAFETY: checked non-null.
    unsafe { *node = h };
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuGraphDestroy(graph: u64) -> CUresult {
    let mut s = state();
    let Some(mem) = s.graphs.remove(&graph) else {
        return INVALID_HANDLE;
    };
    for a in mem {
        s.give_back(a, &[Kind::GraphMem]);
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec: *mut u64,
    graph: u64,
    _flags: u64,
) -> CUresult {
    // SAFETY: forwarded caller pointer.
    unsafe { out(exec, graph) }
}

fn graph_launch(_exec: u64, stream: u64) -> CUresult {
    let dev = stream_device(stream);
    state().occupy(dev, stream, GRAPH_LAUNCH_NS);
    SUCCESS
}
#[unsafe(no_mangle)]
pub extern "C" fn cuGraphLaunch(exec: u64, stream: u64) -> CUresult {
    graph_launch(exec, stream)
}
#[unsafe(no_mangle)]
pub extern "C" fn cuGraphLaunch_ptsz(exec: u64, stream: u64) -> CUresult {
    graph_launch(exec, stream)
}

// ---- modules and launches ---------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleLoadData(m: *mut u64, _image: *const c_void) -> CUresult {
    let h = state().new_handle();
    // SAFETY: forwarded caller pointer.
    unsafe { out(m, h) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuModuleGetFunction(
    f: *mut u64,
    m: u64,
    _name: *const c_char,
) -> CUresult {
    // SAFETY: forwarded caller pointer.
    unsafe { out(f, m + 1) }
}

/// A function handle `WAIT_FLAG | f` is a kernel that waits until flag `f`
/// (16 bits) is set, then runs; `SET_FLAG | f` one that runs and sets it.
/// A producer/consumer pair: the waiter's completion depends on a launch
/// that comes after it (on another stream).
pub const WAIT_FLAG: u64 = 0x5700_0000;
pub const SET_FLAG: u64 = 0x5300_0000;

fn launch(f: u64, gx: c_uint, gy: c_uint, gz: c_uint, stream: u64) -> CUresult {
    if f == 0 {
        return INVALID_HANDLE;
    }
    let blocks = gx as u64 * gy.max(1) as u64 * gz.max(1) as u64;
    let dev = stream_device(stream);
    let mut s = state();
    let flag = (f & 0xFFFF) as u32;
    match f & !0xFFFF {
        WAIT_FLAG => {
            s.launch_wait(dev, stream, flag, blocks * 1000);
        }
        SET_FLAG => {
            let end = s.occupy(dev, stream, blocks * 1000);
            if end != crate::state::BLOCKED {
                s.set_flag(dev, flag, end);
            }
        }
        _ => {
            s.occupy(dev, stream, blocks * 1000);
        }
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn cuLaunchKernel(
    f: u64,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    _bx: c_uint,
    _by: c_uint,
    _bz: c_uint,
    _shmem: c_uint,
    stream: u64,
    _params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    launch(f, gx, gy, gz, stream)
}
#[unsafe(no_mangle)]
pub extern "C" fn cuLaunchKernel_ptsz(
    f: u64,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    _bx: c_uint,
    _by: c_uint,
    _bz: c_uint,
    _shmem: c_uint,
    stream: u64,
    _params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    launch(f, gx, gy, gz, stream)
}
#[unsafe(no_mangle)]
pub extern "C" fn cuLaunchCooperativeKernel(
    f: u64,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    _bx: c_uint,
    _by: c_uint,
    _bz: c_uint,
    _shmem: c_uint,
    stream: u64,
    _params: *mut *mut c_void,
) -> CUresult {
    launch(f, gx, gy, gz, stream)
}
#[unsafe(no_mangle)]
pub extern "C" fn cuLaunchCooperativeKernel_ptsz(
    f: u64,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    _bx: c_uint,
    _by: c_uint,
    _bz: c_uint,
    _shmem: c_uint,
    stream: u64,
    _params: *mut *mut c_void,
) -> CUresult {
    launch(f, gx, gy, gz, stream)
}

/// `CUlaunchConfig`.
#[repr(C)]
pub(crate) struct LaunchConfig {
    pub grid: [c_uint; 3],
    pub block: [c_uint; 3],
    pub shmem: c_uint,
    pub stream: u64,
    pub attrs: *mut c_void,
    pub num_attrs: c_uint,
}

unsafe fn launch_ex(cfg: *const LaunchConfig, f: u64) -> CUresult {
    if cfg.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: non-null, caller-owned.
    let c = unsafe { &*cfg };
    launch(f, c.grid[0], c.grid[1], c.grid[2], c.stream)
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernelEx(
    cfg: *const LaunchConfig,
    f: u64,
    _p: *mut *mut c_void,
    _e: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwarded.
    unsafe { launch_ex(cfg, f) }
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernelEx_ptsz(
    cfg: *const LaunchConfig,
    f: u64,
    _p: *mut *mut c_void,
    _e: *mut *mut c_void,
) -> CUresult {
    // SAFETY: forwarded.
    unsafe { launch_ex(cfg, f) }
}

// ---- streams and events -------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreate(st: *mut u64, _flags: c_uint) -> CUresult {
    let mut s = state();
    let h = s.new_handle();
    s.streams.insert(h, (current_device(), 0));
    // SAFETY: forwarded caller pointer.
    unsafe { out(st, h) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuStreamDestroy_v2(st: u64) -> CUresult {
    if state().streams.remove(&st).is_some() {
        SUCCESS
    } else {
        INVALID_HANDLE
    }
}

fn stream_sync(st: u64) -> CUresult {
    let dev = current_device();
    while_blocked(|s| s.stream_tail(dev, st) == crate::state::BLOCKED);
    let t = state().stream_tail(dev, st);
    sleep_until(t);
    state().settle_pools();
    SUCCESS
}
#[unsafe(no_mangle)]
pub extern "C" fn cuStreamSynchronize(st: u64) -> CUresult {
    stream_sync(st)
}
#[unsafe(no_mangle)]
pub extern "C" fn cuStreamSynchronize_ptsz(st: u64) -> CUresult {
    stream_sync(st)
}

/// Streams are not capturing (`CU_STREAM_CAPTURE_STATUS_NONE`), unless
/// `SIM_GPU_CAPTURING=1` says every stream is (`..._ACTIVE`), for tests.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamIsCapturing(_st: u64, status: *mut c_int) -> CUresult {
    let active = std::env::var("SIM_GPU_CAPTURING").is_ok_and(|v| v == "1");
    // SAFETY: forwarded caller pointer.
    unsafe { out(status, c_int::from(active)) }
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamIsCapturing_ptsz(st: u64, status: *mut c_int) -> CUresult {
    // SAFETY: same contract.
    unsafe { cuStreamIsCapturing(st, status) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(ev: *mut u64, _flags: c_uint) -> CUresult {
    let mut s = state();
    let h = s.new_handle();
    s.events.insert(h, None);
    // SAFETY: forwarded caller pointer.
    unsafe { out(ev, h) }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventDestroy_v2(ev: u64) -> CUresult {
    if state().events.remove(&ev).is_some() {
        SUCCESS
    } else {
        INVALID_HANDLE
    }
}

fn event_record(ev: u64, st: u64) -> CUresult {
    let mut s = state();
    let dev = if st == 0 {
        current_device()
    } else {
        s.streams.get(&st).map_or(current_device(), |x| x.0)
    };
    let t = s.stream_tail(dev, st).max(now_ns());
    s.pending_events.retain(|&(e, _)| e != ev);
    if t == crate::state::BLOCKED && s.events.contains_key(&ev) {
        // Completes when the stream is released.
        s.pending_events.push((ev, st));
    }
    match s.events.get_mut(&ev) {
        Some(e) => {
            *e = Some(t);
            SUCCESS
        }
        None => INVALID_HANDLE,
    }
}
#[unsafe(no_mangle)]
pub extern "C" fn cuEventRecord(ev: u64, st: u64) -> CUresult {
    event_record(ev, st)
}
#[unsafe(no_mangle)]
pub extern "C" fn cuEventRecord_ptsz(ev: u64, st: u64) -> CUresult {
    event_record(ev, st)
}

fn event_time(ev: u64) -> Result<Option<u64>, CUresult> {
    state().events.get(&ev).copied().ok_or(INVALID_HANDLE)
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventQuery(ev: u64) -> CUresult {
    match event_time(ev) {
        Ok(Some(t)) if t > now_ns() => NOT_READY,
        Ok(_) => SUCCESS,
        Err(e) => e,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn cuEventSynchronize(ev: u64) -> CUresult {
    while_blocked(|s| s.events.get(&ev) == Some(&Some(crate::state::BLOCKED)));
    match event_time(ev) {
        Ok(t) => {
            sleep_until(t.unwrap_or(0));
            SUCCESS
        }
        Err(e) => e,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: u64, end: u64) -> CUresult {
    match (event_time(start), event_time(end)) {
        (Ok(Some(a)), Ok(Some(b))) => {
            if a.max(b) > now_ns() {
                return NOT_READY;
            }
            // SAFETY: forwarded caller pointer.
            unsafe { out(ms, (b as f64 - a as f64) as f32 / 1e6) }
        }
        (Ok(_), Ok(_)) => INVALID_HANDLE,
        (Err(e), _) | (_, Err(e)) => e,
    }
}

// ---- cuGetProcAddress -----------------------------------------------------------

/// `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM`.
const PTDS: u64 = 2;

/// One versioned entry point: name asked for, first CUDA version,
/// per-thread-stream variant?, symbol name, address.
/// The symbol name is only read by the unit tests; it keeps the table legible.
#[cfg_attr(not(test), allow(dead_code))]
struct Entry(&'static str, c_int, bool, &'static str, *const ());

// SAFETY: function addresses only.
unsafe impl Sync for Entry {}

/// The versioned entry points, as the real driver keeps them: addresses are
/// taken directly (like a driver's internal table), not looked up with
/// `dlsym`, which an interposer may override.
/// Mirrors how the real driver versions its entry points: the newest entry
/// whose version is at most the caller's wins; the `_ptsz`/`_ptds` entry
/// only when the caller asks for per-thread default streams.
static TABLE: &[Entry] = &[
    Entry("cuInit", 2000, false, "cuInit", cuInit as *const ()),
    Entry(
        "cuDriverGetVersion",
        2020,
        false,
        "cuDriverGetVersion",
        cuDriverGetVersion as *const (),
    ),
    Entry(
        "cuDeviceGet",
        2000,
        false,
        "cuDeviceGet",
        cuDeviceGet as *const (),
    ),
    Entry(
        "cuDeviceGetPCIBusId",
        4010,
        false,
        "cuDeviceGetPCIBusId",
        cuDeviceGetPCIBusId as *const (),
    ),
    Entry(
        "cuDeviceGetCount",
        2000,
        false,
        "cuDeviceGetCount",
        cuDeviceGetCount as *const (),
    ),
    Entry(
        "cuDeviceGetName",
        2000,
        false,
        "cuDeviceGetName",
        cuDeviceGetName as *const (),
    ),
    Entry(
        "cuDeviceGetUuid",
        9020,
        false,
        "cuDeviceGetUuid",
        cuDeviceGetUuid as *const (),
    ),
    Entry(
        "cuDeviceGetUuid",
        11040,
        false,
        "cuDeviceGetUuid_v2",
        cuDeviceGetUuid_v2 as *const (),
    ),
    Entry(
        "cuDeviceTotalMem",
        3020,
        false,
        "cuDeviceTotalMem_v2",
        cuDeviceTotalMem_v2 as *const (),
    ),
    Entry(
        "cuDeviceGetAttribute",
        2000,
        false,
        "cuDeviceGetAttribute",
        cuDeviceGetAttribute as *const (),
    ),
    Entry(
        "cuDevicePrimaryCtxRetain",
        7000,
        false,
        "cuDevicePrimaryCtxRetain",
        cuDevicePrimaryCtxRetain as *const (),
    ),
    Entry(
        "cuDevicePrimaryCtxRelease",
        11000,
        false,
        "cuDevicePrimaryCtxRelease_v2",
        cuDevicePrimaryCtxRelease_v2 as *const (),
    ),
    Entry(
        "cuCtxCreate",
        3020,
        false,
        "cuCtxCreate_v2",
        cuCtxCreate_v2 as *const (),
    ),
    Entry(
        "cuCtxDestroy",
        2000,
        false,
        "cuCtxDestroy",
        cuCtxDestroy as *const (),
    ),
    Entry(
        "cuCtxDestroy",
        4000,
        false,
        "cuCtxDestroy_v2",
        cuCtxDestroy_v2 as *const (),
    ),
    Entry(
        "cuDevicePrimaryCtxReset",
        7000,
        false,
        "cuDevicePrimaryCtxReset",
        cuDevicePrimaryCtxReset as *const (),
    ),
    Entry(
        "cuDevicePrimaryCtxReset",
        11000,
        false,
        "cuDevicePrimaryCtxReset_v2",
        cuDevicePrimaryCtxReset_v2 as *const (),
    ),
    Entry(
        "cuDevicePrimaryCtxGetState",
        7000,
        false,
        "cuDevicePrimaryCtxGetState",
        cuDevicePrimaryCtxGetState as *const (),
    ),
    Entry(
        "cuCtxSetCurrent",
        4000,
        false,
        "cuCtxSetCurrent",
        cuCtxSetCurrent as *const (),
    ),
    Entry(
        "cuCtxGetCurrent",
        4000,
        false,
        "cuCtxGetCurrent",
        cuCtxGetCurrent as *const (),
    ),
    Entry(
        "cuCtxGetDevice",
        2000,
        false,
        "cuCtxGetDevice",
        cuCtxGetDevice as *const (),
    ),
    Entry(
        "cuCtxSynchronize",
        2000,
        false,
        "cuCtxSynchronize",
        cuCtxSynchronize as *const (),
    ),
    Entry(
        "cuMemAlloc",
        3020,
        false,
        "cuMemAlloc_v2",
        cuMemAlloc_v2 as *const (),
    ),
    Entry(
        "cuMemAlloc",
        13000,
        false,
        "cuMemAlloc_v3",
        cuMemAlloc_v3 as *const (),
    ),
    Entry(
        "cuMemAllocPitch",
        3020,
        false,
        "cuMemAllocPitch_v2",
        cuMemAllocPitch_v2 as *const (),
    ),
    Entry(
        "cuMemAllocManaged",
        6000,
        false,
        "cuMemAllocManaged",
        cuMemAllocManaged as *const (),
    ),
    Entry(
        "cuMemFree",
        3020,
        false,
        "cuMemFree_v2",
        cuMemFree_v2 as *const (),
    ),
    Entry(
        "cuMemGetInfo",
        3020,
        false,
        "cuMemGetInfo_v2",
        cuMemGetInfo_v2 as *const (),
    ),
    Entry(
        "cuMemGetAddressRange",
        3020,
        false,
        "cuMemGetAddressRange_v2",
        cuMemGetAddressRange_v2 as *const (),
    ),
    Entry(
        "cuMemAllocAsync",
        11020,
        false,
        "cuMemAllocAsync",
        cuMemAllocAsync as *const (),
    ),
    Entry(
        "cuMemAllocAsync",
        11020,
        true,
        "cuMemAllocAsync_ptsz",
        cuMemAllocAsync_ptsz as *const (),
    ),
    Entry(
        "cuMemFreeAsync",
        11020,
        false,
        "cuMemFreeAsync",
        cuMemFreeAsync as *const (),
    ),
    Entry(
        "cuMemFreeAsync",
        11020,
        true,
        "cuMemFreeAsync_ptsz",
        cuMemFreeAsync_ptsz as *const (),
    ),
    Entry(
        "cuMemAllocFromPoolAsync",
        11020,
        false,
        "cuMemAllocFromPoolAsync",
        cuMemAllocFromPoolAsync as *const (),
    ),
    Entry(
        "cuMemAllocFromPoolAsync",
        11020,
        true,
        "cuMemAllocFromPoolAsync_ptsz",
        cuMemAllocFromPoolAsync_ptsz as *const (),
    ),
    Entry(
        "cuDeviceGetDefaultMemPool",
        11020,
        false,
        "cuDeviceGetDefaultMemPool",
        cuDeviceGetDefaultMemPool as *const (),
    ),
    Entry(
        "cuMemPoolTrimTo",
        11020,
        false,
        "cuMemPoolTrimTo",
        cuMemPoolTrimTo as *const (),
    ),
    Entry(
        "cuMemCreate",
        10020,
        false,
        "cuMemCreate",
        cuMemCreate as *const (),
    ),
    Entry(
        "cuMemRelease",
        10020,
        false,
        "cuMemRelease",
        cuMemRelease as *const (),
    ),
    Entry(
        "cuArrayCreate",
        3020,
        false,
        "cuArrayCreate_v2",
        cuArrayCreate_v2 as *const (),
    ),
    Entry(
        "cuArray3DCreate",
        3020,
        false,
        "cuArray3DCreate_v2",
        cuArray3DCreate_v2 as *const (),
    ),
    Entry(
        "cuArrayDestroy",
        2000,
        false,
        "cuArrayDestroy",
        cuArrayDestroy as *const (),
    ),
    Entry(
        "cuMipmappedArrayCreate",
        5000,
        false,
        "cuMipmappedArrayCreate",
        cuMipmappedArrayCreate as *const (),
    ),
    Entry(
        "cuMipmappedArrayDestroy",
        5000,
        false,
        "cuMipmappedArrayDestroy",
        cuMipmappedArrayDestroy as *const (),
    ),
    Entry(
        "cuIpcGetMemHandle",
        4010,
        false,
        "cuIpcGetMemHandle",
        cuIpcGetMemHandle as *const (),
    ),
    Entry(
        "cuIpcOpenMemHandle",
        11000,
        false,
        "cuIpcOpenMemHandle_v2",
        cuIpcOpenMemHandle_v2 as *const (),
    ),
    Entry(
        "cuIpcCloseMemHandle",
        4010,
        false,
        "cuIpcCloseMemHandle",
        cuIpcCloseMemHandle as *const (),
    ),
    Entry(
        "cuImportExternalMemory",
        10000,
        false,
        "cuImportExternalMemory",
        cuImportExternalMemory as *const (),
    ),
    Entry(
        "cuDestroyExternalMemory",
        10000,
        false,
        "cuDestroyExternalMemory",
        cuDestroyExternalMemory as *const (),
    ),
    Entry(
        "cuGraphCreate",
        10000,
        false,
        "cuGraphCreate",
        cuGraphCreate as *const (),
    ),
    Entry(
        "cuGraphAddMemAllocNode",
        11040,
        false,
        "cuGraphAddMemAllocNode",
        cuGraphAddMemAllocNode as *const (),
    ),
    Entry(
        "cuGraphDestroy",
        10000,
        false,
        "cuGraphDestroy",
        cuGraphDestroy as *const (),
    ),
    Entry(
        "cuGraphInstantiateWithFlags",
        11040,
        false,
        "cuGraphInstantiateWithFlags",
        cuGraphInstantiateWithFlags as *const (),
    ),
    Entry(
        "cuGraphLaunch",
        10000,
        false,
        "cuGraphLaunch",
        cuGraphLaunch as *const (),
    ),
    Entry(
        "cuGraphLaunch",
        10000,
        true,
        "cuGraphLaunch_ptsz",
        cuGraphLaunch_ptsz as *const (),
    ),
    Entry(
        "cuModuleLoadData",
        2000,
        false,
        "cuModuleLoadData",
        cuModuleLoadData as *const (),
    ),
    Entry(
        "cuModuleGetFunction",
        2000,
        false,
        "cuModuleGetFunction",
        cuModuleGetFunction as *const (),
    ),
    Entry(
        "cuLaunchKernel",
        4000,
        false,
        "cuLaunchKernel",
        cuLaunchKernel as *const (),
    ),
    Entry(
        "cuLaunchKernel",
        7000,
        true,
        "cuLaunchKernel_ptsz",
        cuLaunchKernel_ptsz as *const (),
    ),
    Entry(
        "cuLaunchKernelEx",
        11060,
        false,
        "cuLaunchKernelEx",
        cuLaunchKernelEx as *const (),
    ),
    Entry(
        "cuLaunchKernelEx",
        11060,
        true,
        "cuLaunchKernelEx_ptsz",
        cuLaunchKernelEx_ptsz as *const (),
    ),
    Entry(
        "cuLaunchCooperativeKernel",
        9000,
        false,
        "cuLaunchCooperativeKernel",
        cuLaunchCooperativeKernel as *const (),
    ),
    Entry(
        "cuLaunchCooperativeKernel",
        9000,
        true,
        "cuLaunchCooperativeKernel_ptsz",
        cuLaunchCooperativeKernel_ptsz as *const (),
    ),
    Entry(
        "cuStreamCreate",
        2000,
        false,
        "cuStreamCreate",
        cuStreamCreate as *const (),
    ),
    Entry(
        "cuStreamDestroy",
        4000,
        false,
        "cuStreamDestroy_v2",
        cuStreamDestroy_v2 as *const (),
    ),
    Entry(
        "cuStreamSynchronize",
        2000,
        false,
        "cuStreamSynchronize",
        cuStreamSynchronize as *const (),
    ),
    Entry(
        "cuStreamSynchronize",
        7000,
        true,
        "cuStreamSynchronize_ptsz",
        cuStreamSynchronize_ptsz as *const (),
    ),
    Entry(
        "cuEventCreate",
        2000,
        false,
        "cuEventCreate",
        cuEventCreate as *const (),
    ),
    Entry(
        "cuEventRecord",
        2000,
        false,
        "cuEventRecord",
        cuEventRecord as *const (),
    ),
    Entry(
        "cuEventRecord",
        7000,
        true,
        "cuEventRecord_ptsz",
        cuEventRecord_ptsz as *const (),
    ),
    Entry(
        "cuEventQuery",
        2000,
        false,
        "cuEventQuery",
        cuEventQuery as *const (),
    ),
    Entry(
        "cuEventSynchronize",
        2000,
        false,
        "cuEventSynchronize",
        cuEventSynchronize as *const (),
    ),
    Entry(
        "cuEventElapsedTime",
        2000,
        false,
        "cuEventElapsedTime",
        cuEventElapsedTime as *const (),
    ),
    Entry(
        "cuEventDestroy",
        4000,
        false,
        "cuEventDestroy_v2",
        cuEventDestroy_v2 as *const (),
    ),
    Entry(
        "cuGetProcAddress",
        11030,
        false,
        "cuGetProcAddress",
        cuGetProcAddress as *const (),
    ),
    Entry(
        "cuGetProcAddress",
        12000,
        false,
        "cuGetProcAddress_v2",
        cuGetProcAddress_v2 as *const (),
    ),
    Entry(
        "cuDeviceGetMemPool",
        11020,
        false,
        "cuDeviceGetMemPool",
        cuDeviceGetMemPool as *const (),
    ),
    Entry(
        "cuMemPoolGetAttribute",
        11020,
        false,
        "cuMemPoolGetAttribute",
        cuMemPoolGetAttribute as *const (),
    ),
    Entry(
        "cuMemPoolSetAttribute",
        11020,
        false,
        "cuMemPoolSetAttribute",
        cuMemPoolSetAttribute as *const (),
    ),
];

/// The symbol the driver would hand out for (`name`, `version`, `flags`).
#[cfg(test)]
fn resolve(name: &str, version: c_int, flags: u64) -> Option<&'static str> {
    entry(name, version, flags).map(|e| e.3)
}

fn entry(name: &str, version: c_int, flags: u64) -> Option<&'static Entry> {
    let fits = |ptds: bool| {
        TABLE
            .iter()
            .filter(|e| e.0 == name && e.1 <= version && e.2 == ptds)
            .max_by_key(|e| e.1)
    };
    if flags & PTDS != 0 {
        fits(true).or_else(|| fits(false))
    } else {
        fits(false)
    }
}

unsafe fn get_proc_address(
    sym: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    if sym.is_null() || pfn.is_null() {
        return INVALID_VALUE;
    }
    // SAFETY: NUL-terminated per the API contract.
    let name = unsafe { std::ffi::CStr::from_ptr(sym) }
        .to_str()
        .unwrap_or("");
    let found = entry(name, version, flags).map(|e| e.4 as *mut c_void);
    // SAFETY: checked non-null; `status` optional.
    unsafe {
        *pfn = found.unwrap_or(std::ptr::null_mut());
        if !status.is_null() {
            // CU_GET_PROC_ADDRESS_SUCCESS = 0, SYMBOL_NOT_FOUND = 1.
            *status = if found.is_some() { 0 } else { 1 };
        }
    }
    if found.is_some() { SUCCESS } else { NOT_FOUND }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    sym: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
) -> CUresult {
    // SAFETY: forwarded.
    unsafe { get_proc_address(sym, pfn, version, flags, std::ptr::null_mut()) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    sym: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    // SAFETY: forwarded.
    unsafe { get_proc_address(sym, pfn, version, flags, status) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versioned_resolution() {
        assert_eq!(resolve("cuMemAlloc", 12000, 0), Some("cuMemAlloc_v2"));
        assert_eq!(resolve("cuMemAlloc", 3000, 0), None);
        assert_eq!(
            resolve("cuLaunchKernel", 12000, PTDS),
            Some("cuLaunchKernel_ptsz")
        );
        assert_eq!(resolve("cuLaunchKernel", 12000, 1), Some("cuLaunchKernel"));
        assert_eq!(resolve("cuMemAlloc", 12000, PTDS), Some("cuMemAlloc_v2"));
        assert_eq!(
            resolve("cuDeviceGetUuid", 11000, 0),
            Some("cuDeviceGetUuid")
        );
        assert_eq!(
            resolve("cuDeviceGetUuid", 12000, 0),
            Some("cuDeviceGetUuid_v2")
        );
        assert_eq!(
            resolve("cuGetProcAddress", 12000, 0),
            Some("cuGetProcAddress_v2")
        );
        assert_eq!(resolve("cuNoSuch", 12000, 0), None);
    }

    #[test]
    fn uuid_text_to_bytes() {
        let b = uuid_bytes("GPU-01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(b[0], 0x01);
        assert_eq!(b[15], 0xef);
    }
}
