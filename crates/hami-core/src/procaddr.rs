//! The `cuGetProcAddress` path, used by the CUDA runtime for every driver
//! entry point it calls.
//!
//! A request is (base name, CUDA version the caller was built for, flags).
//! [`VERSIONS`] holds the driver's real versioned entry points for every
//! function we guard, with the CUDA version that introduced each and whether
//! it is the per-thread-default-stream (`_ptsz`/`_ptds`) variant. We ask the
//! real driver first, pick the entry the driver would pick from the table,
//! and hand out our hook for exactly that symbol only when the driver's
//! answer is provably that entry point: it equals the symbol's address, or
//! the driver gives the same address when asked at the version that entry
//! was introduced. Otherwise (a newer version we do not know yet, say) the
//! caller gets the driver's own function and we log a warning: the program
//! keeps working with the right signature, never with a guessed hook.

use crate::ffi::*;
use std::ffi::{CStr, c_char, c_int, c_void};

/// (base name, first CUDA version, per-thread stream variant, symbol).
/// Entries whose symbol has no hook (old `_v1` forms) are listed so that
/// old requests resolve to the old function and are left alone.
pub const VERSIONS: &[(&str, c_int, bool, &str)] = &[
    ("cuGetProcAddress", 11030, false, "cuGetProcAddress"),
    ("cuGetProcAddress", 12000, false, "cuGetProcAddress_v2"),
    ("cuMemAlloc", 2000, false, "cuMemAlloc"),
    ("cuMemAlloc", 3020, false, "cuMemAlloc_v2"),
    ("cuMemAllocPitch", 2000, false, "cuMemAllocPitch"),
    ("cuMemAllocPitch", 3020, false, "cuMemAllocPitch_v2"),
    ("cuMemAllocManaged", 6000, false, "cuMemAllocManaged"),
    ("cuMemFree", 2000, false, "cuMemFree"),
    ("cuMemFree", 3020, false, "cuMemFree_v2"),
    ("cuMemAllocAsync", 11020, false, "cuMemAllocAsync"),
    ("cuMemAllocAsync", 11020, true, "cuMemAllocAsync_ptsz"),
    (
        "cuMemAllocFromPoolAsync",
        11020,
        false,
        "cuMemAllocFromPoolAsync",
    ),
    (
        "cuMemAllocFromPoolAsync",
        11020,
        true,
        "cuMemAllocFromPoolAsync_ptsz",
    ),
    ("cuMemFreeAsync", 11020, false, "cuMemFreeAsync"),
    ("cuMemFreeAsync", 11020, true, "cuMemFreeAsync_ptsz"),
    ("cuMemPoolTrimTo", 11020, false, "cuMemPoolTrimTo"),
    ("cuMemCreate", 10020, false, "cuMemCreate"),
    ("cuMemRelease", 10020, false, "cuMemRelease"),
    ("cuArrayCreate", 2000, false, "cuArrayCreate"),
    ("cuArrayCreate", 3020, false, "cuArrayCreate_v2"),
    ("cuArray3DCreate", 2000, false, "cuArray3DCreate"),
    ("cuArray3DCreate", 3020, false, "cuArray3DCreate_v2"),
    ("cuArrayDestroy", 2000, false, "cuArrayDestroy"),
    (
        "cuMipmappedArrayCreate",
        5000,
        false,
        "cuMipmappedArrayCreate",
    ),
    (
        "cuMipmappedArrayDestroy",
        5000,
        false,
        "cuMipmappedArrayDestroy",
    ),
    ("cuIpcOpenMemHandle", 4010, false, "cuIpcOpenMemHandle"),
    ("cuIpcOpenMemHandle", 11000, false, "cuIpcOpenMemHandle_v2"),
    ("cuIpcCloseMemHandle", 4010, false, "cuIpcCloseMemHandle"),
    (
        "cuImportExternalMemory",
        10000,
        false,
        "cuImportExternalMemory",
    ),
    (
        "cuDestroyExternalMemory",
        10000,
        false,
        "cuDestroyExternalMemory",
    ),
    (
        "cuGraphAddMemAllocNode",
        11040,
        false,
        "cuGraphAddMemAllocNode",
    ),
    ("cuGraphDestroy", 10000, false, "cuGraphDestroy"),
    ("cuCtxDestroy", 2000, false, "cuCtxDestroy"),
    ("cuCtxDestroy", 4000, false, "cuCtxDestroy_v2"),
    (
        "cuDevicePrimaryCtxReset",
        7000,
        false,
        "cuDevicePrimaryCtxReset",
    ),
    (
        "cuDevicePrimaryCtxReset",
        11000,
        false,
        "cuDevicePrimaryCtxReset_v2",
    ),
    ("cuMemGetInfo", 2000, false, "cuMemGetInfo"),
    ("cuMemGetInfo", 3020, false, "cuMemGetInfo_v2"),
    ("cuDeviceTotalMem", 2000, false, "cuDeviceTotalMem"),
    ("cuDeviceTotalMem", 3020, false, "cuDeviceTotalMem_v2"),
    ("cuLaunchKernel", 4000, false, "cuLaunchKernel"),
    ("cuLaunchKernel", 7000, true, "cuLaunchKernel_ptsz"),
    ("cuLaunchKernelEx", 11060, false, "cuLaunchKernelEx"),
    ("cuLaunchKernelEx", 11060, true, "cuLaunchKernelEx_ptsz"),
    (
        "cuLaunchCooperativeKernel",
        9000,
        false,
        "cuLaunchCooperativeKernel",
    ),
    (
        "cuLaunchCooperativeKernel",
        9000,
        true,
        "cuLaunchCooperativeKernel_ptsz",
    ),
    ("cuGraphLaunch", 10000, false, "cuGraphLaunch"),
    ("cuGraphLaunch", 10000, true, "cuGraphLaunch_ptsz"),
];

/// The entry the driver hands out for (`name`, `version`, `flags`):
/// the newest whose version is at most `version`, the per-thread-stream
/// variant when the flags ask for it and one exists.
pub fn versioned(
    name: &[u8],
    version: c_int,
    flags: u64,
) -> Option<&'static (&'static str, c_int, bool, &'static str)> {
    let pick = |ptds: bool| {
        VERSIONS
            .iter()
            .filter(|e| e.0.as_bytes() == name && e.1 <= version && e.2 == ptds)
            .max_by_key(|e| e.1)
    };
    if flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM != 0 {
        pick(true).or_else(|| pick(false))
    } else {
        pick(false)
    }
}

type Gpa = unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64) -> CUresult;

/// Swaps the driver's answer in `*pfn` for our hook when it is provably the
/// entry point the hook wraps. `ask` re-queries the driver at a version.
unsafe fn substitute(
    sym: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    ask: &dyn Fn(c_int) -> *mut c_void,
) {
    if sym.is_null() || pfn.is_null() {
        return;
    }
    // SAFETY: checked non-null; written by the driver on success.
    let got = unsafe { *pfn };
    if got.is_null() {
        return;
    }
    // SAFETY: NUL-terminated per the API contract.
    let name = unsafe { CStr::from_ptr(sym) }.to_bytes();
    let Some(entry) = versioned(name, version, flags) else {
        return;
    };
    let Some(hook) = crate::hooks::named(entry.3) else {
        return;
    };
    let real = crate::dl::resolve(hook.real, hook.name, hook.lib);
    if real == got || ask(entry.1) == got {
        // SAFETY: checked non-null.
        unsafe { *pfn = hook.hook as *mut c_void };
    } else {
        hlog!(
            crate::log::WARN,
            "cuGetProcAddress({}, {version}, {flags}): the driver returned an entry point other than {}; not intercepted",
            entry.0,
            entry.3
        );
    }
}

pub(crate) unsafe fn get_proc_address(
    real: Gpa,
    sym: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
) -> CUresult {
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { real(sym, pfn, version, flags) };
    if r == CUDA_SUCCESS {
        let ask = |v: c_int| {
            let mut p = std::ptr::null_mut();
            // SAFETY: same symbol, our own out pointer.
            unsafe { real(sym, &mut p, v, flags) };
            p
        };
        // SAFETY: arguments checked inside.
        unsafe { substitute(sym, pfn, version, flags, &ask) };
    }
    r
}

pub(crate) unsafe fn get_proc_address_v2(
    real: unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CUresult,
    sym: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CUresult {
    // SAFETY: forwarding the caller's arguments.
    let r = unsafe { real(sym, pfn, version, flags, status) };
    if r == CUDA_SUCCESS {
        let ask = |v: c_int| {
            let mut p = std::ptr::null_mut();
            // SAFETY: same symbol, our own out pointers.
            unsafe { real(sym, &mut p, v, flags, std::ptr::null_mut()) };
            p
        };
        // SAFETY: arguments checked inside.
        unsafe { substitute(sym, pfn, version, flags, &ask) };
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_entry_at_or_below_the_version() {
        assert_eq!(
            versioned(b"cuMemAlloc", 12000, 0).unwrap().3,
            "cuMemAlloc_v2"
        );
        assert_eq!(versioned(b"cuMemAlloc", 3010, 0).unwrap().3, "cuMemAlloc");
        assert_eq!(
            versioned(b"cuLaunchKernel", 12000, 2).unwrap().3,
            "cuLaunchKernel_ptsz"
        );
        assert_eq!(
            versioned(b"cuLaunchKernel", 12000, 1).unwrap().3,
            "cuLaunchKernel"
        );
        assert_eq!(
            versioned(b"cuMemAlloc", 12000, 2).unwrap().3,
            "cuMemAlloc_v2"
        );
        assert!(versioned(b"cuMemPrefetchAsync", 12000, 0).is_none());
        assert!(versioned(b"cuMemAllocAsync", 11000, 0).is_none());
    }

    #[test]
    fn every_hook_has_a_version_entry() {
        for h in crate::hooks::CUDA_HOOKS {
            let name = std::str::from_utf8(&h.name[..h.name.len() - 1]).unwrap();
            assert!(
                VERSIONS.iter().any(|e| e.3 == name),
                "{name} has no version entry"
            );
        }
        for e in VERSIONS.iter().filter(|e| e.1 > 3000) {
            assert!(
                crate::hooks::named(e.3).is_some(),
                "{} is listed but not hooked",
                e.3
            );
        }
    }
}
