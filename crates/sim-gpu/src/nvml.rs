//! The simulated NVML: what unmodified clients (nvml-wrapper, pynvml,
//! go-nvml, monitoring agents) call, with nvml.h's struct layouts and
//! constants. Device handles are `0x4E00 + index`; event sets
//! `0x4500_0000 + n`.
//!
//! What is modelled beyond the device file (see `docs/interposer.md`):
//! card `i` of `n` sits at PCI `00000000:<i+1>:00.0`; with two or more
//! cards the first half is on NUMA node 0 and the rest on node 1, the
//! online CPUs split the same way; cards `2k` and `2k+1` share a PCIe
//! switch; compute capability and architecture come from the model number
//! in the name; ECC and persistence mode are on, MIG off; temperature,
//! power and clocks follow the card's utilisation. Fans, NVLink and
//! anything else not modelled answer `NVML_ERROR_NOT_SUPPORTED`.

use crate::state::state;
use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_ulong, c_ulonglong};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

type NvmlReturn = c_int;
const SUCCESS: NvmlReturn = 0;
const UNINITIALIZED: NvmlReturn = 1;
const INVALID_ARGUMENT: NvmlReturn = 2;
const NOT_SUPPORTED: NvmlReturn = 3;
const NOT_FOUND: NvmlReturn = 6;
const INSUFFICIENT_SIZE: NvmlReturn = 7;
const TIMEOUT: NvmlReturn = 10;
const ARGUMENT_VERSION_MISMATCH: NvmlReturn = 25;
const HANDLE_BASE: usize = 0x4E00;
const EVENT_SET_BASE: usize = 0x4500_0000;

/// `nvmlPciInfo_t` (nvmlDeviceGetPciInfo_v3).
#[repr(C)]
pub struct NvmlPciInfo {
    pub bus_id_legacy: [c_char; 16],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pci_device_id: c_uint,
    pub pci_sub_system_id: c_uint,
    pub bus_id: [c_char; 32],
}

/// `nvmlPciInfoExt_v1_t` (nvmlDeviceGetPciInfoExt).
#[repr(C)]
pub struct NvmlPciInfoExt {
    pub version: c_uint,
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pci_device_id: c_uint,
    pub pci_sub_system_id: c_uint,
    pub base_class: c_uint,
    pub sub_class: c_uint,
    pub bus_id: [c_char; 32],
}

/// `NVML_STRUCT_VERSION(PciInfoExt, 1)`, which the caller sets.
pub const PCI_INFO_EXT_VERSION: c_uint = std::mem::size_of::<NvmlPciInfoExt>() as c_uint | 1 << 24;

/// The `nvmlPciInfo_t` of NVML before 9.0, which nvmlDeviceGetPciInfo and
/// nvmlDeviceGetPciInfo_v2 still fill for the programs built against it
/// (its first 36 bytes are the current struct's).
#[repr(C)]
pub struct NvmlPciInfoV1 {
    pub bus_id: [c_char; 16],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pci_device_id: c_uint,
    pub pci_sub_system_id: c_uint,
    pub reserved: [c_uint; 4],
}

/// `nvmlMemory_t`.
#[repr(C)]
pub struct NvmlMemory {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlMemory_v2`: `NVML_STRUCT_VERSION(Memory, 2)`, which the caller sets.
pub const MEMORY_V2_VERSION: c_uint = std::mem::size_of::<NvmlMemoryV2>() as c_uint | 2 << 24;

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

// nvml.h's sizes.
const _: () = {
    use std::mem::size_of;
    assert!(size_of::<NvmlPciInfo>() == 68);
    assert!(size_of::<NvmlPciInfoV1>() == 52);
    assert!(size_of::<NvmlPciInfoExt>() == 64);
    assert!(size_of::<NvmlMemory>() == 24);
    assert!(size_of::<NvmlMemoryV2>() == 40);
    assert!(size_of::<NvmlProcessInfo>() == 24);
    assert!(size_of::<NvmlProcessInfoV1>() == 16);
};

/// The card's index, or `INVALID_ARGUMENT` for anything but a handle.
fn dev(h: usize) -> Result<usize, NvmlReturn> {
    index(h).ok_or(INVALID_ARGUMENT)
}

fn index(h: usize) -> Option<usize> {
    let i = h.checked_sub(HANDLE_BASE)?;
    (i < state().devices.len()).then_some(i)
}

/// Writes `v` to the caller's `p`.
unsafe fn out<T>(p: *mut T, v: T) -> NvmlReturn {
    if p.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null; the caller passes room for a `T`.
    unsafe { p.write(v) };
    SUCCESS
}

/// Exports `fn $name(device, *mut $t)`: `$i` is the card's index and the
/// body's `Result` is written out or returned as the error.
macro_rules! getter {
    ($(#[$m:meta])* $name:ident, $t:ty, |$i:ident| $body:expr) => {
        $(#[$m])*
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(h: usize, v: *mut $t) -> NvmlReturn {
            let r: Result<$t, NvmlReturn> = dev(h).and_then(|$i| $body);
            match r {
                // SAFETY: the caller's out pointer.
                Ok(x) => unsafe { out(v, x) },
                Err(e) => e,
            }
        }
    };
}

/// Exports functions of any signature that answer `NVML_ERROR_NOT_SUPPORTED`.
macro_rules! not_supported {
    ($($name:ident($($a:ident: $t:ty),*);)*) => {$(
        #[unsafe(no_mangle)]
        pub extern "C" fn $name($(_: $t),*) -> NvmlReturn {
            NOT_SUPPORTED
        }
    )*};
}

// ---- The model: what a card is beyond its line in the device file. ----

fn count() -> usize {
    state().devices.len()
}

/// PCI bus of card `i` (domain 0, device 0, function 0).
pub(crate) fn pci_bus(i: usize) -> u32 {
    (i as u32 + 1) & 0xff
}

/// `(device id << 16) | vendor id`: an NVIDIA card of the architecture.
fn pci_device_id(i: usize) -> u32 {
    let device = match compute_capability(i).0 {
        10 => 0x2901,
        9 => 0x2330,
        8 => 0x20B2,
        7 => 0x1DB6,
        _ => 0x15F8,
    };
    (device << 16) | 0x10DE
}

const PCI_SUBSYSTEM_ID: u32 = 0x16C1_10DE;

fn bus_id(i: usize) -> String {
    format!("{:08X}:{:02X}:00.0", 0, pci_bus(i))
}

fn bus_id_legacy(i: usize) -> String {
    format!("{:04X}:{:02X}:00.0", 0, pci_bus(i))
}

/// NUMA node of card `i` of `n`: the first half on 0, the rest on 1.
fn numa_node(i: usize, n: usize) -> u32 {
    if n >= 2 { (i * 2 / n) as u32 } else { 0 }
}

fn numa_nodes(n: usize) -> u32 {
    if n >= 2 { 2 } else { 1 }
}

/// The online CPUs of NUMA node `node` (all of them with one node, or
/// when the machine has too few to split).
fn cpus_of(node: u32, nodes: u32) -> std::ops::Range<usize> {
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let per = online / nodes as usize;
    if per == 0 {
        return 0..online;
    }
    let start = per * node as usize;
    let end = if node + 1 == nodes {
        online
    } else {
        start + per
    };
    start..end
}

fn compute_capability(i: usize) -> (u32, u32) {
    state().devices[i].spec.compute_capability()
}

/// `NVML_DEVICE_ARCH_*` of a compute capability.
fn architecture(cc: (u32, u32)) -> u32 {
    match cc {
        (10.., _) => 10,
        (9, _) => 9,
        (8, 9) => 8,
        (8, _) => 7,
        (7, 5) => 6,
        (7, _) => 5,
        (6, _) => 4,
        (5, _) => 3,
        _ => 2,
    }
}

fn utilization(i: usize) -> u32 {
    state().utilization(i)
}

/// Milliwatts: the limit, and drawn at idle.
const POWER_LIMIT_MW: u32 = 300_000;
const POWER_IDLE_MW: u32 = 60_000;
const POWER_MIN_LIMIT_MW: u32 = 100_000;

/// MHz at full clocks: graphics, SM, memory, video (`NVML_CLOCK_*` order).
const MAX_CLOCKS: [u32; 4] = [1980, 1980, 2619, 1545];
/// MHz at idle (memory stays at full speed).
const IDLE_CLOCKS: [u32; 4] = [345, 345, 2619, 540];

const TEMPERATURE_IDLE_C: u32 = 30;

/// `NVML_TEMPERATURE_THRESHOLD_*` 0..=3 in degrees C: shutdown, slowdown,
/// memory max, GPU max.
const TEMPERATURE_THRESHOLDS: [u32; 4] = [92, 89, 95, 87];

/// Single- and double-bit ECC, P-state, Xid and clock events.
const SUPPORTED_EVENTS: u64 = 0x1 | 0x2 | 0x4 | 0x8 | 0x10;

// ---- Initialisation and the system. ----

static INITS: AtomicU32 = AtomicU32::new(0);

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    drop(state());
    INITS.fetch_add(1, Relaxed);
    SUCCESS
}
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit() -> NvmlReturn {
    nvmlInit_v2()
}
/// `NVML_INIT_FLAG_NO_GPUS` and `_NO_ATTACH` change nothing here.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> NvmlReturn {
    nvmlInit_v2()
}
/// Balances one init; `NVML_ERROR_UNINITIALIZED` with none outstanding.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    match INITS.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)) {
        Ok(_) => SUCCESS,
        Err(_) => UNINITIALIZED,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(r: NvmlReturn) -> *const c_char {
    let s: &'static CStr = match r {
        0 => c"Success",
        1 => c"Uninitialized",
        2 => c"Invalid Argument",
        3 => c"Not Supported",
        4 => c"Insufficient Permissions",
        5 => c"Already Initialized",
        6 => c"Not Found",
        7 => c"Insufficient Size",
        8 => c"Insufficient External Power",
        9 => c"Driver Not Loaded",
        10 => c"Timeout",
        11 => c"Interrupt request issue",
        12 => c"NVML Shared Library Not Found",
        13 => c"Function Not Found",
        14 => c"Corrupted infoROM",
        15 => c"GPU is lost",
        16 => c"GPU requires restart",
        17 => c"The operating system has blocked the request.",
        18 => c"RM has detected an NVML/RM version mismatch.",
        19 => c"In use by another client",
        20 => c"Insufficient Memory",
        21 => c"No data",
        22 => c"The requested vgpu operation is not available on target device, because ECC is enabled",
        23 => c"Ran out of critical resources, other than memory",
        24 => c"The requested frequency is not supported",
        25 => c"The provided version is invalid/unsupported",
        26 => c"The requested functionality has been deprecated",
        27 => c"The system is not ready for the request",
        28 => c"The GPU is not found",
        29 => c"The resource is in an invalid state",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

/// The driver release whose CUDA version `cuDriverGetVersion` reports.
const DRIVER_VERSION: &str = "550.54.15";

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(v: *mut c_char, len: c_uint) -> NvmlReturn {
    copy(v, len, DRIVER_VERSION)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(v: *mut c_char, len: c_uint) -> NvmlReturn {
    let cuda_major = crate::cuda::DRIVER_VERSION / 1000;
    copy(v, len, &format!("{cuda_major}.{DRIVER_VERSION}"))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(v: *mut c_int) -> NvmlReturn {
    // SAFETY: the caller's out pointer.
    unsafe { out(v, crate::cuda::DRIVER_VERSION) }
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(v: *mut c_int) -> NvmlReturn {
    // SAFETY: the caller's out pointer.
    unsafe { out(v, crate::cuda::DRIVER_VERSION) }
}

/// The process's name (`/proc/<pid>/comm`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetProcessName(
    pid: c_uint,
    name: *mut c_char,
    len: c_uint,
) -> NvmlReturn {
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => copy(name, len, comm.trim_end()),
        Err(_) => NOT_FOUND,
    }
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

/// `s` into a fixed `char[N]`, NUL-terminated (truncated to fit).
fn fixed<const N: usize>(s: &str) -> [c_char; N] {
    let mut a = [0 as c_char; N];
    for (d, b) in a.iter_mut().zip(s.bytes().take(N - 1)) {
        *d = b as c_char;
    }
    a
}

// ---- Devices: count and handles. ----

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(n: *mut c_uint) -> NvmlReturn {
    // SAFETY: the caller's out pointer.
    unsafe { out(n, count() as c_uint) }
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount(n: *mut c_uint) -> NvmlReturn {
    // SAFETY: forwarded.
    unsafe { nvmlDeviceGetCount_v2(n) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(i: c_uint, h: *mut usize) -> NvmlReturn {
    if i as usize >= count() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: the caller's out pointer.
    unsafe { out(h, HANDLE_BASE + i as usize) }
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(i: c_uint, h: *mut usize) -> NvmlReturn {
    // SAFETY: forwarded.
    unsafe { nvmlDeviceGetHandleByIndex_v2(i, h) }
}

/// The handle of the first card `matches` accepts, else `NOT_FOUND`.
unsafe fn find(
    key: *const c_char,
    h: *mut usize,
    matches: impl Fn(usize, &str) -> bool,
) -> NvmlReturn {
    if key.is_null() || h.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: a NUL-terminated string per the API contract.
    let Ok(key) = unsafe { CStr::from_ptr(key) }.to_str() else {
        return INVALID_ARGUMENT;
    };
    match (0..count()).find(|&i| matches(i, key.trim())) {
        // SAFETY: checked non-null.
        Some(i) => unsafe { out(h, HANDLE_BASE + i) },
        None => NOT_FOUND,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    h: *mut usize,
) -> NvmlReturn {
    // SAFETY: forwarded caller pointers.
    unsafe { find(uuid, h, |i, key| state().devices[i].spec.uuid == key) }
}

/// `[[domain:]bus:]device[.function]` in hex, as NVML accepts it.
fn parse_bus_id(s: &str) -> Option<(u32, u32, u32)> {
    let (rest, _function) = s.split_once('.').unwrap_or((s, "0"));
    let parts: Vec<&str> = rest.split(':').collect();
    let hex = |p: &str| u32::from_str_radix(p, 16).ok();
    match parts.as_slice() {
        [d, b, dev] => Some((hex(d)?, hex(b)?, hex(dev)?)),
        [b, dev] => Some((0, hex(b)?, hex(dev)?)),
        _ => None,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId_v2(
    bus_id: *const c_char,
    h: *mut usize,
) -> NvmlReturn {
    // SAFETY: forwarded caller pointers.
    unsafe {
        find(bus_id, h, |i, key| {
            parse_bus_id(key) == Some((0, pci_bus(i), 0))
        })
    }
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId(
    bus_id: *const c_char,
    h: *mut usize,
) -> NvmlReturn {
    // SAFETY: forwarded.
    unsafe { nvmlDeviceGetHandleByPciBusId_v2(bus_id, h) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleBySerial(
    serial: *const c_char,
    h: *mut usize,
) -> NvmlReturn {
    // SAFETY: forwarded caller pointers.
    unsafe { find(serial, h, |i, key| serial_of(i) == key) }
}

// ---- Identity. ----

getter!(nvmlDeviceGetIndex, c_uint, |i| Ok(i as c_uint));
getter!(
    /// `/dev/nvidia<minor>`: the index.
    nvmlDeviceGetMinorNumber, c_uint, |i| Ok(i as c_uint)
);

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

/// 13 digits, from the index.
fn serial_of(i: usize) -> String {
    format!("{}", 1_320_000_000_000u64 + i as u64)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSerial(
    h: usize,
    serial: *mut c_char,
    len: c_uint,
) -> NvmlReturn {
    match index(h) {
        Some(i) => copy(serial, len, &serial_of(i)),
        None => INVALID_ARGUMENT,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetVbiosVersion(
    h: usize,
    v: *mut c_char,
    len: c_uint,
) -> NvmlReturn {
    match index(h) {
        Some(_) => copy(v, len, "96.00.99.00.01"),
        None => INVALID_ARGUMENT,
    }
}

getter!(
    /// `NVML_BRAND_NVIDIA`, what data-centre cards report.
    nvmlDeviceGetBrand, c_uint, |_i| Ok(14)
);
getter!(nvmlDeviceGetArchitecture, c_uint, |i| Ok(architecture(
    compute_capability(i)
)));

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCudaComputeCapability(
    h: usize,
    major: *mut c_int,
    minor: *mut c_int,
) -> NvmlReturn {
    let Ok(i) = dev(h) else {
        return INVALID_ARGUMENT;
    };
    if major.is_null() || minor.is_null() {
        return INVALID_ARGUMENT;
    }
    let (ma, mi) = compute_capability(i);
    // SAFETY: checked non-null.
    unsafe {
        *major = ma as c_int;
        *minor = mi as c_int;
    }
    SUCCESS
}

// ---- PCI, NUMA, topology. ----

fn pci_info(i: usize) -> NvmlPciInfo {
    NvmlPciInfo {
        bus_id_legacy: fixed(&bus_id_legacy(i)),
        domain: 0,
        bus: pci_bus(i),
        device: 0,
        pci_device_id: pci_device_id(i),
        pci_sub_system_id: PCI_SUBSYSTEM_ID,
        bus_id: fixed(&bus_id(i)),
    }
}

fn pci_info_v1(i: usize) -> NvmlPciInfoV1 {
    NvmlPciInfoV1 {
        bus_id: fixed(&bus_id_legacy(i)),
        domain: 0,
        bus: pci_bus(i),
        device: 0,
        pci_device_id: pci_device_id(i),
        pci_sub_system_id: PCI_SUBSYSTEM_ID,
        reserved: [0; 4],
    }
}

getter!(nvmlDeviceGetPciInfo_v3, NvmlPciInfo, |i| Ok(pci_info(i)));

/// Display controller class, 3D controller subclass (what compute cards are).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfoExt(h: usize, p: *mut NvmlPciInfoExt) -> NvmlReturn {
    let Ok(i) = dev(h) else {
        return INVALID_ARGUMENT;
    };
    // SAFETY: read only when non-null.
    if p.is_null() || unsafe { (*p).version } != PCI_INFO_EXT_VERSION {
        return if p.is_null() {
            INVALID_ARGUMENT
        } else {
            ARGUMENT_VERSION_MISMATCH
        };
    }
    let v = pci_info(i);
    // SAFETY: checked non-null.
    unsafe {
        out(
            p,
            NvmlPciInfoExt {
                version: PCI_INFO_EXT_VERSION,
                domain: v.domain,
                bus: v.bus,
                device: v.device,
                pci_device_id: v.pci_device_id,
                pci_sub_system_id: v.pci_sub_system_id,
                base_class: 0x03,
                sub_class: 0x02,
                bus_id: v.bus_id,
            },
        )
    }
}
getter!(nvmlDeviceGetPciInfo_v2, NvmlPciInfoV1, |i| Ok(pci_info_v1(
    i
)));
getter!(nvmlDeviceGetPciInfo, NvmlPciInfoV1, |i| Ok(pci_info_v1(i)));

getter!(
    /// PCIe 5.0.
    nvmlDeviceGetCurrPcieLinkGeneration, c_uint, |_i| Ok(5)
);
getter!(nvmlDeviceGetMaxPcieLinkGeneration, c_uint, |_i| Ok(5));
getter!(nvmlDeviceGetCurrPcieLinkWidth, c_uint, |_i| Ok(16));
getter!(nvmlDeviceGetMaxPcieLinkWidth, c_uint, |_i| Ok(16));

getter!(nvmlDeviceGetNumaNodeId, c_uint, |i| Ok(numa_node(
    i,
    count()
)));

/// Sets the bits of `bits` in the caller's `unsigned long[size]`.
unsafe fn bitmask(size: c_uint, set: *mut c_ulong, bits: std::ops::Range<usize>) -> NvmlReturn {
    if set.is_null() || size == 0 {
        return INVALID_ARGUMENT;
    }
    let word = c_ulong::BITS as usize;
    // SAFETY: the caller's array of `size` words.
    let words = unsafe { std::slice::from_raw_parts_mut(set, size as usize) };
    words.fill(0);
    let room = words.len() * word;
    for b in bits.take_while(|&b| b < room) {
        words[b / word] |= 1 << (b % word);
    }
    SUCCESS
}

unsafe fn cpu_affinity(h: usize, size: c_uint, set: *mut c_ulong) -> NvmlReturn {
    let Ok(i) = dev(h) else {
        return INVALID_ARGUMENT;
    };
    let n = count();
    // SAFETY: forwarded caller pointer.
    unsafe { bitmask(size, set, cpus_of(numa_node(i, n), numa_nodes(n))) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCpuAffinity(
    h: usize,
    size: c_uint,
    set: *mut c_ulong,
) -> NvmlReturn {
    // SAFETY: forwarded.
    unsafe { cpu_affinity(h, size, set) }
}

/// Both scopes (`NVML_AFFINITY_SCOPE_NODE` 0, `_SOCKET` 1) are the node.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCpuAffinityWithinScope(
    h: usize,
    size: c_uint,
    set: *mut c_ulong,
    _scope: c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded.
    unsafe { cpu_affinity(h, size, set) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryAffinity(
    h: usize,
    size: c_uint,
    set: *mut c_ulong,
    _scope: c_uint,
) -> NvmlReturn {
    let Ok(i) = dev(h) else {
        return INVALID_ARGUMENT;
    };
    let node = numa_node(i, count()) as usize;
    // SAFETY: forwarded caller pointer.
    unsafe { bitmask(size, set, node..node + 1) }
}

/// `NVML_TOPOLOGY_*` between cards `a` and `b`: the same card INTERNAL,
/// a pair on one PCIe switch SINGLE, one NUMA node NODE, else SYSTEM.
fn topology(a: usize, b: usize) -> c_uint {
    let n = count();
    if a == b {
        0
    } else if a / 2 == b / 2 && numa_node(a, n) == numa_node(b, n) {
        10
    } else if numa_node(a, n) == numa_node(b, n) {
        40
    } else {
        50
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTopologyCommonAncestor(
    a: usize,
    b: usize,
    level: *mut c_uint,
) -> NvmlReturn {
    match (dev(a), dev(b)) {
        // SAFETY: the caller's out pointer.
        (Ok(a), Ok(b)) => unsafe { out(level, topology(a, b)) },
        _ => INVALID_ARGUMENT,
    }
}

/// Writes `found` handles to `(count, devices)` the NVML way: with no
/// array (or too small a one) only the count.
unsafe fn handle_list(found: &[usize], n: *mut c_uint, devices: *mut usize) -> NvmlReturn {
    if n.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null; `devices` has room for `*n` handles.
    unsafe {
        let room = *n as usize;
        *n = found.len() as c_uint;
        if devices.is_null() {
            return if room == 0 { SUCCESS } else { INVALID_ARGUMENT };
        }
        if room < found.len() {
            return INSUFFICIENT_SIZE;
        }
        for (k, &i) in found.iter().enumerate() {
            devices.add(k).write(HANDLE_BASE + i);
        }
    }
    SUCCESS
}

/// The other cards no further than `level`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTopologyNearestGpus(
    h: usize,
    level: c_uint,
    n: *mut c_uint,
    devices: *mut usize,
) -> NvmlReturn {
    let Ok(i) = dev(h) else {
        return INVALID_ARGUMENT;
    };
    let found: Vec<usize> = (0..count())
        .filter(|&j| j != i && topology(i, j) <= level)
        .collect();
    // SAFETY: forwarded caller pointers.
    unsafe { handle_list(&found, n, devices) }
}

/// The cards on the NUMA node of CPU `cpu`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetTopologyGpuSet(
    cpu: c_uint,
    n: *mut c_uint,
    devices: *mut usize,
) -> NvmlReturn {
    let total = count();
    let nodes = numa_nodes(total);
    let found: Vec<usize> = (0..total)
        .filter(|&j| cpus_of(numa_node(j, total), nodes).contains(&(cpu as usize)))
        .collect();
    // SAFETY: forwarded caller pointers.
    unsafe { handle_list(&found, n, devices) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceOnSameBoard(a: usize, b: usize, same: *mut c_int) -> NvmlReturn {
    match (dev(a), dev(b)) {
        // SAFETY: the caller's out pointer.
        (Ok(a), Ok(b)) => unsafe { out(same, (a == b) as c_int) },
        _ => INVALID_ARGUMENT,
    }
}

// No NVLink: every link query is not supported (PCIe only).
not_supported! {
    nvmlDeviceGetNvLinkState(h: usize, link: c_uint, active: *mut c_uint);
    nvmlDeviceGetNvLinkVersion(h: usize, link: c_uint, version: *mut c_uint);
    nvmlDeviceGetNvLinkCapability(h: usize, link: c_uint, cap: c_uint, result: *mut c_uint);
    nvmlDeviceGetNvLinkRemotePciInfo_v2(h: usize, link: c_uint, pci: *mut NvmlPciInfo);
    nvmlDeviceGetNvLinkRemotePciInfo(h: usize, link: c_uint, pci: *mut NvmlPciInfo);
    nvmlDeviceGetNvLinkRemoteDeviceType(h: usize, link: c_uint, t: *mut c_uint);
    nvmlDeviceGetNvLinkErrorCounter(h: usize, link: c_uint, counter: c_uint, v: *mut c_ulonglong);
    nvmlDeviceGetNvLinkUtilizationCounter(h: usize, link: c_uint, counter: c_uint, rx: *mut c_ulonglong, tx: *mut c_ulonglong);
}

// ---- MIG: no instances; the mode is off unless `SIM_GPU_MIG` lists the
// card's UUID (comma-separated), to test what a MIG-mode card does to its
// clients. ----

fn mig_enabled(i: usize) -> bool {
    let uuid = state().devices[i].spec.uuid.clone();
    std::env::var("SIM_GPU_MIG")
        .is_ok_and(|v| v.split(',').any(|u| u.trim().eq_ignore_ascii_case(&uuid)))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    h: usize,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> NvmlReturn {
    let Ok(i) = dev(h) else {
        return INVALID_ARGUMENT;
    };
    if current.is_null() || pending.is_null() {
        return INVALID_ARGUMENT;
    }
    let mode = c_uint::from(mig_enabled(i));
    // SAFETY: checked non-null; 0 `NVML_DEVICE_MIG_DISABLE`, 1 `_ENABLE`.
    unsafe {
        *current = mode;
        *pending = mode;
    }
    SUCCESS
}
getter!(nvmlDeviceIsMigDeviceHandle, c_uint, |_i| Ok(0));
getter!(nvmlDeviceGetMaxMigDeviceCount, c_uint, |_i| Ok(0));

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    h: usize,
    _i: c_uint,
    _mig: *mut usize,
) -> NvmlReturn {
    if dev(h).is_err() {
        INVALID_ARGUMENT
    } else {
        NOT_FOUND
    }
}
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    h: usize,
    _parent: *mut usize,
) -> NvmlReturn {
    if dev(h).is_err() {
        INVALID_ARGUMENT
    } else {
        NOT_FOUND
    }
}
not_supported! {
    nvmlDeviceGetGpuInstanceId(h: usize, id: *mut c_uint);
    nvmlDeviceGetComputeInstanceId(h: usize, id: *mut c_uint);
}

// ---- Memory. ----

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
    // SAFETY: read only when non-null.
    if !m.is_null() && unsafe { (*m).version } != MEMORY_V2_VERSION {
        return ARGUMENT_VERSION_MISMATCH;
    }
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

/// `nvmlSample_t`: a CPU timestamp (µs) and a value (here an unsigned int).
#[repr(C)]
pub struct NvmlSample {
    pub time_stamp: u64,
    pub value: u64,
}

/// `NVML_GPU_UTILIZATION_SAMPLES`.
const GPU_UTILIZATION_SAMPLES: c_uint = 1;
/// `NVML_VALUE_TYPE_UNSIGNED_INT`.
const VALUE_TYPE_UNSIGNED_INT: c_uint = 1;
/// The sampling period of the simulated driver, µs (NVML's is between
/// 1/6 s and 1 s, by product).
const SAMPLE_US: u64 = 50_000;
/// Samples kept: one second of them.
const SAMPLES_KEPT: u64 = 1_000_000 / SAMPLE_US;

/// GPU utilization samples: one per finished [`SAMPLE_US`] period of the
/// last second after `last_seen` (µs of CLOCK_MONOTONIC), each the percent of
/// its period the card was busy. Other sample types are not supported.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSamples(
    h: usize,
    kind: c_uint,
    last_seen: u64,
    value_type: *mut c_uint,
    count: *mut c_uint,
    samples: *mut NvmlSample,
) -> NvmlReturn {
    let Some(i) = index(h) else {
        return INVALID_ARGUMENT;
    };
    if count.is_null() || value_type.is_null() {
        return INVALID_ARGUMENT;
    }
    if kind != GPU_UTILIZATION_SAMPLES {
        return NOT_SUPPORTED;
    }
    // SAFETY: checked non-null.
    unsafe { *value_type = VALUE_TYPE_UNSIGNED_INT };
    if samples.is_null() {
        // SAFETY: checked non-null.
        unsafe { *count = SAMPLES_KEPT as c_uint };
        return SUCCESS;
    }
    let now_us = crate::state::now_ns() / 1000;
    let last_done = now_us / SAMPLE_US;
    let first = (last_done.saturating_sub(SAMPLES_KEPT - 1)).max(last_seen / SAMPLE_US + 1);
    // SAFETY: the caller's buffer holds `*count` samples.
    let room = unsafe { *count } as u64;
    let n = last_done.saturating_sub(first).min(room);
    let busy = state().devices[i].shared.busy_percents(
        first * SAMPLE_US * 1000,
        SAMPLE_US * 1000,
        n as usize,
    );
    for (k, percent) in busy.into_iter().enumerate() {
        // SAFETY: k < n <= room.
        unsafe {
            *samples.add(k) = NvmlSample {
                time_stamp: (first + k as u64 + 1) * SAMPLE_US,
                value: u64::from(percent),
            };
        }
    }
    // SAFETY: checked non-null.
    unsafe { *count = n as c_uint };
    if n == 0 { NOT_FOUND } else { SUCCESS }
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
    let st = state();
    let list = st.devices[i].shared.processes(&st.devices[i].slot);
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

/// Graphics and MPS clients: none are simulated.
macro_rules! empty_process_list {
    ($($name:ident: $t:ty;)*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(h: usize, n: *mut c_uint, _p: *mut $t) -> NvmlReturn {
            if dev(h).is_err() {
                return INVALID_ARGUMENT;
            }
            // SAFETY: the caller's out pointer.
            unsafe { out(n, 0) }
        }
    )*};
}
empty_process_list! {
    nvmlDeviceGetGraphicsRunningProcesses_v3: NvmlProcessInfo;
    nvmlDeviceGetGraphicsRunningProcesses_v2: NvmlProcessInfo;
    nvmlDeviceGetGraphicsRunningProcesses: NvmlProcessInfoV1;
    nvmlDeviceGetMPSComputeRunningProcesses_v3: NvmlProcessInfo;
    nvmlDeviceGetMPSComputeRunningProcesses_v2: NvmlProcessInfo;
    nvmlDeviceGetMPSComputeRunningProcesses: NvmlProcessInfoV1;
}

// ---- Sensors: they follow the card's utilisation. ----

/// `NVML_TEMPERATURE_GPU` only: 30 C idle, +0.4 C per percent busy.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    h: usize,
    sensor: c_uint,
    t: *mut c_uint,
) -> NvmlReturn {
    match (dev(h), sensor) {
        // SAFETY: the caller's out pointer.
        (Ok(i), 0) => unsafe { out(t, TEMPERATURE_IDLE_C + utilization(i) * 2 / 5) },
        _ => INVALID_ARGUMENT,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperatureThreshold(
    h: usize,
    which: c_uint,
    t: *mut c_uint,
) -> NvmlReturn {
    match (dev(h), TEMPERATURE_THRESHOLDS.get(which as usize)) {
        // SAFETY: the caller's out pointer.
        (Ok(_), Some(&v)) => unsafe { out(t, v) },
        (Ok(_), None) if which < 8 => NOT_SUPPORTED,
        _ => INVALID_ARGUMENT,
    }
}

getter!(
    /// Milliwatts: idle draw plus the busy share of the rest of the limit.
    nvmlDeviceGetPowerUsage, c_uint, |i| Ok(
        POWER_IDLE_MW + (POWER_LIMIT_MW - POWER_IDLE_MW) / 100 * utilization(i)
    )
);
getter!(nvmlDeviceGetPowerManagementLimit, c_uint, |_i| Ok(
    POWER_LIMIT_MW
));
getter!(nvmlDeviceGetPowerManagementDefaultLimit, c_uint, |_i| Ok(
    POWER_LIMIT_MW
));
getter!(nvmlDeviceGetEnforcedPowerLimit, c_uint, |_i| Ok(
    POWER_LIMIT_MW
));
getter!(
    /// `NVML_FEATURE_ENABLED`.
    nvmlDeviceGetPowerManagementMode, c_uint, |_i| Ok(1)
);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerManagementLimitConstraints(
    h: usize,
    min: *mut c_uint,
    max: *mut c_uint,
) -> NvmlReturn {
    if dev(h).is_err() || min.is_null() || max.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null.
    unsafe {
        *min = POWER_MIN_LIMIT_MW;
        *max = POWER_LIMIT_MW;
    }
    SUCCESS
}

getter!(
    /// P0 while busy, P8 idle.
    nvmlDeviceGetPerformanceState, c_uint, |i| Ok(if utilization(i) > 0 { 0 } else { 8 })
);
getter!(nvmlDeviceGetPowerState, c_uint, |i| Ok(
    if utilization(i) > 0 { 0 } else { 8 }
));

/// MHz of `NVML_CLOCK_*` `which`: full clocks while busy.
fn clock(i: usize, which: c_uint) -> Result<c_uint, NvmlReturn> {
    let table = if utilization(i) > 0 {
        MAX_CLOCKS
    } else {
        IDLE_CLOCKS
    };
    table.get(which as usize).copied().ok_or(INVALID_ARGUMENT)
}

fn max_clock(which: c_uint) -> Result<c_uint, NvmlReturn> {
    MAX_CLOCKS
        .get(which as usize)
        .copied()
        .ok_or(INVALID_ARGUMENT)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    h: usize,
    which: c_uint,
    mhz: *mut c_uint,
) -> NvmlReturn {
    match dev(h).and_then(|i| clock(i, which)) {
        // SAFETY: the caller's out pointer.
        Ok(v) => unsafe { out(mhz, v) },
        Err(e) => e,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxClockInfo(
    h: usize,
    which: c_uint,
    mhz: *mut c_uint,
) -> NvmlReturn {
    match dev(h).and_then(|_| max_clock(which)) {
        // SAFETY: the caller's out pointer.
        Ok(v) => unsafe { out(mhz, v) },
        Err(e) => e,
    }
}

/// `NVML_CLOCK_ID_CURRENT` is the clock now; the application-clock
/// target, its default and the customer boost maximum are full clocks.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClock(
    h: usize,
    which: c_uint,
    id: c_uint,
    mhz: *mut c_uint,
) -> NvmlReturn {
    let v = match id {
        0 => dev(h).and_then(|i| clock(i, which)),
        1..=3 => dev(h).and_then(|_| max_clock(which)),
        _ => Err(INVALID_ARGUMENT),
    };
    match v {
        // SAFETY: the caller's out pointer.
        Ok(v) => unsafe { out(mhz, v) },
        Err(e) => e,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetApplicationsClock(
    h: usize,
    which: c_uint,
    mhz: *mut c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded.
    unsafe { nvmlDeviceGetClock(h, which, 1, mhz) }
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetDefaultApplicationsClock(
    h: usize,
    which: c_uint,
    mhz: *mut c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded.
    unsafe { nvmlDeviceGetClock(h, which, 2, mhz) }
}
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxCustomerBoostClock(
    h: usize,
    which: c_uint,
    mhz: *mut c_uint,
) -> NvmlReturn {
    // SAFETY: forwarded.
    unsafe { nvmlDeviceGetClock(h, which, 3, mhz) }
}

// Passively cooled, like data-centre cards: no fans.
getter!(nvmlDeviceGetNumFans, c_uint, |_i| Ok(0));
getter!(nvmlDeviceGetFanSpeed, c_uint, |_i| Err(NOT_SUPPORTED));
not_supported! {
    nvmlDeviceGetFanSpeed_v2(h: usize, fan: c_uint, speed: *mut c_uint);
    nvmlDeviceGetFanSpeedRPM(h: usize, fan: *mut c_uint);
    nvmlDeviceGetTargetFanSpeed(h: usize, fan: c_uint, speed: *mut c_uint);
    nvmlDeviceGetMinMaxFanSpeed(h: usize, min: *mut c_uint, max: *mut c_uint);
    nvmlDeviceGetTotalEnergyConsumption(h: usize, mj: *mut c_ulonglong);
    nvmlDeviceGetBAR1MemoryInfo(h: usize, bar1: *mut [c_ulonglong; 3]);
    nvmlDeviceGetProcessUtilization(h: usize, samples: *mut u8, n: *mut c_uint, since: c_ulonglong);
    nvmlDeviceGetEncoderUtilization(h: usize, u: *mut c_uint, period: *mut c_uint);
    nvmlDeviceGetDecoderUtilization(h: usize, u: *mut c_uint, period: *mut c_uint);
    nvmlDeviceGetPcieThroughput(h: usize, counter: c_uint, v: *mut c_uint);
    nvmlDeviceGetBoardPartNumber(h: usize, v: *mut c_char, len: c_uint);
    nvmlDeviceGetInforomImageVersion(h: usize, v: *mut c_char, len: c_uint);
    nvmlDeviceGetCurrentClocksThrottleReasons(h: usize, r: *mut c_ulonglong);
    nvmlDeviceGetCurrentClocksEventReasons(h: usize, r: *mut c_ulonglong);
    nvmlDeviceGetRetiredPages(h: usize, cause: c_uint, n: *mut c_uint, addrs: *mut c_ulonglong);
    nvmlDeviceGetRemappedRows(h: usize, a: *mut c_uint, b: *mut c_uint, c: *mut c_uint, d: *mut c_uint);
    nvmlDeviceGetFieldValues(h: usize, n: c_int, values: *mut u8);
}

// ---- Modes. ----

getter!(
    /// `NVML_FEATURE_ENABLED`.
    nvmlDeviceGetPersistenceMode, c_uint, |_i| Ok(1)
);
getter!(
    /// `NVML_COMPUTEMODE_DEFAULT`.
    nvmlDeviceGetComputeMode, c_uint, |_i| Ok(0)
);
getter!(
    /// No display attached.
    nvmlDeviceGetDisplayMode, c_uint, |_i| Ok(0)
);
getter!(nvmlDeviceGetDisplayActive, c_uint, |_i| Ok(0));

/// ECC on, now and after the next reboot.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEccMode(
    h: usize,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> NvmlReturn {
    if dev(h).is_err() || current.is_null() || pending.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: checked non-null.
    unsafe {
        *current = 1;
        *pending = 1;
    }
    SUCCESS
}

/// No ECC errors, of any type and counter.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    h: usize,
    _error_type: c_uint,
    _counter: c_uint,
    n: *mut c_ulonglong,
) -> NvmlReturn {
    match dev(h) {
        // SAFETY: the caller's out pointer.
        Ok(_) => unsafe { out(n, 0) },
        Err(e) => e,
    }
}

// ---- Events: registered and waited for; none ever happens. ----

/// Event set handle -> (card, event types) registered on it.
type EventSets = HashMap<usize, Vec<(usize, u64)>>;
static EVENT_SETS: Mutex<Option<EventSets>> = Mutex::new(None);
static NEXT_EVENT_SET: AtomicU32 = AtomicU32::new(0);

fn event_sets() -> std::sync::MutexGuard<'static, Option<EventSets>> {
    EVENT_SETS.lock().unwrap_or_else(|p| p.into_inner())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut usize) -> NvmlReturn {
    if set.is_null() {
        return INVALID_ARGUMENT;
    }
    let h = EVENT_SET_BASE + NEXT_EVENT_SET.fetch_add(1, Relaxed) as usize;
    event_sets().get_or_insert_default().insert(h, Vec::new());
    // SAFETY: checked non-null.
    unsafe { out(set, h) }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetFree(set: usize) -> NvmlReturn {
    match event_sets().as_mut().and_then(|m| m.remove(&set)) {
        Some(_) => SUCCESS,
        None => INVALID_ARGUMENT,
    }
}

getter!(nvmlDeviceGetSupportedEventTypes, c_ulonglong, |_i| Ok(
    SUPPORTED_EVENTS
));

/// `NVML_ERROR_NOT_SUPPORTED` when asked for a type the card cannot report.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceRegisterEvents(h: usize, types: c_ulonglong, set: usize) -> NvmlReturn {
    let Ok(i) = dev(h) else {
        return INVALID_ARGUMENT;
    };
    if types & !SUPPORTED_EVENTS != 0 {
        return NOT_SUPPORTED;
    }
    match event_sets().as_mut().and_then(|m| m.get_mut(&set)) {
        Some(v) => {
            v.push((i, types));
            SUCCESS
        }
        None => INVALID_ARGUMENT,
    }
}

/// Waits the whole timeout and reports `NVML_ERROR_TIMEOUT`: nothing
/// happens on a simulated card. `data` (`nvmlEventData_t`, either
/// version) is left alone.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetWait_v2(
    set: usize,
    _data: *mut u8,
    timeout_ms: c_uint,
) -> NvmlReturn {
    if !event_sets().as_ref().is_some_and(|m| m.contains_key(&set)) {
        return INVALID_ARGUMENT;
    }
    std::thread::sleep(std::time::Duration::from_millis(timeout_ms.into()));
    TIMEOUT
}
#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetWait(set: usize, data: *mut u8, timeout_ms: c_uint) -> NvmlReturn {
    nvmlEventSetWait_v2(set, data, timeout_ms)
}
