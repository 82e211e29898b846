//! Symbol resolution: our `dlsym` override and the handles of the real
//! driver and NVML.
//!
//! The CUDA runtime `dlopen`s `libcuda.so.1` and looks entry points up with
//! `dlsym` (then `cuGetProcAddress`), so preloading alone does not catch it.
//! We export `dlsym`: it asks the real one (found once with `dlvsym`, which
//! does not go through `dlsym`), and when the symbol exists and is one we
//! guard, returns our hook instead. It is re-entrant, takes no lock and never
//! allocates, because libc, libstdc++ and Rust's std call `dlsym` at times
//! when neither is safe.
//!
//! `dlsym(RTLD_NEXT, name)` means "the next definition after the *caller's*
//! object", and glibc finds the caller from its return address. A plain
//! wrapper would make glibc see `libvgpu.so` as the caller: a library
//! preloaded after us (jemalloc, tcmalloc, a profiler) asking for
//! `dlsym(RTLD_NEXT, "malloc")` would get its own `malloc` back (endless
//! recursion), or skip a definition. So on x86_64 and aarch64 the exported
//! `dlsym` is a small naked trampoline: for `RTLD_NEXT` it *jumps* (a tail
//! call, the return address untouched) to the real `dlsym`, which then sees
//! the original caller; every other handle goes to [`dlsym_hooked`]. (On
//! other architectures `RTLD_NEXT` resolves relative to `libvgpu.so`.)

use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicPtr, AtomicU8, Ordering::*};

type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

static REAL_DLSYM: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static CUDA: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static NVML: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
/// 0 not read yet, 1 control enabled, 2 `CUDA_DISABLE_CONTROL=true`.
static DISABLED: AtomicU8 = AtomicU8::new(0);

/// A guarded entry point: its exported name (NUL-terminated), our hook and
/// the slot caching the real function.
pub struct Hook {
    pub name: &'static [u8],
    pub hook: *const (),
    pub real: &'static AtomicPtr<c_void>,
    pub lib: Lib,
}

// SAFETY: function addresses and atomics only.
unsafe impl Sync for Hook {}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lib {
    Cuda,
    Nvml,
}

/// The real `dlsym`, from the next object that defines it (libc).
pub(crate) fn real_dlsym() -> Option<DlsymFn> {
    let mut p = REAL_DLSYM.load(Acquire);
    if p.is_null() {
        for version in [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17", c"GLIBC_2.0"] {
            // SAFETY: static NUL-terminated strings; dlvsym does not call dlsym.
            p = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr()) };
            if !p.is_null() {
                break;
            }
        }
        if p.is_null() {
            return None;
        }
        REAL_DLSYM.store(p, Release);
    }
    // SAFETY: p is glibc's dlsym.
    Some(unsafe { std::mem::transmute::<*mut c_void, DlsymFn>(p) })
}

fn ascii_eq_ignore_case(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.eq_ignore_ascii_case(y))
}

/// Whether `CUDA_DISABLE_CONTROL` turns the interposer off. Reads the env
/// with `getenv` (no allocation) once.
pub fn control_disabled() -> bool {
    match DISABLED.load(Relaxed) {
        1 => false,
        2 => true,
        _ => {
            // SAFETY: NUL-terminated name; the result is read before any setenv could matter.
            let v = unsafe { libc::getenv(c"CUDA_DISABLE_CONTROL".as_ptr()) };
            let off = !v.is_null() && {
                // SAFETY: getenv returns a NUL-terminated string.
                let s = unsafe { std::ffi::CStr::from_ptr(v) }.to_bytes();
                ascii_eq_ignore_case(s, b"true") || s == b"1" || ascii_eq_ignore_case(s, b"yes")
            };
            DISABLED.store(if off { 2 } else { 1 }, Relaxed);
            off
        }
    }
}

/// Our hook for a NUL-terminated `name`, if we guard it.
pub(crate) fn find_hook(name: *const c_char) -> Option<&'static Hook> {
    if name.is_null() {
        return None;
    }
    // SAFETY: callers of dlsym pass a NUL-terminated string.
    let bytes = unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes_with_nul();
    if !(bytes.starts_with(b"cu") || bytes.starts_with(b"nvml")) {
        return None;
    }
    crate::hooks::all().find(|h| h.name == bytes)
}

/// The real `dlsym` (null if not found), for the trampoline's first call.
extern "C" fn real_dlsym_ptr() -> *mut c_void {
    real_dlsym().map_or(std::ptr::null_mut(), |f| f as *mut c_void)
}

/// The exported `dlsym`: `RTLD_NEXT` goes straight to the real one with the
/// caller's return address in place (see the module docs), anything else
/// to [`dlsym_hooked`].
///
/// # Safety
/// Same contract as glibc's `dlsym`.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    std::arch::naked_asm!(
        // RTLD_NEXT is ((void *) -1).
        "cmp rdi, -1",
        "jne {hooked}",
        "mov rax, qword ptr [rip + {real}]",
        "test rax, rax",
        "jz 2f",
        // Tail call: the real dlsym sees our caller's return address.
        "jmp rax",
        "2:",
        // First use: find the real dlsym (arguments saved, stack aligned).
        "push rdi",
        "push rsi",
        "sub rsp, 8",
        "call {resolve}",
        "add rsp, 8",
        "pop rsi",
        "pop rdi",
        "test rax, rax",
        "jz 3f",
        "jmp rax",
        "3:",
        "ret",
        hooked = sym dlsym_hooked,
        real = sym REAL_DLSYM,
        resolve = sym real_dlsym_ptr,
    )
}

/// See the x86_64 version.
///
/// # Safety
/// Same contract as glibc's `dlsym`.
#[cfg(target_arch = "aarch64")]
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    std::arch::naked_asm!(
        "cmn x0, #1",
        "b.eq 1f",
        "b {hooked}",
        "1:",
        "adrp x16, {real}",
        "ldr x16, [x16, :lo12:{real}]",
        "cbz x16, 2f",
        // Tail call: x30 (the return address) is still our caller's.
        "br x16",
        "2:",
        "stp x29, x30, [sp, #-32]!",
        "mov x29, sp",
        "stp x0, x1, [sp, #16]",
        "bl {resolve}",
        "mov x16, x0",
        "ldp x0, x1, [sp, #16]",
        "ldp x29, x30, [sp], #32",
        "cbz x16, 3f",
        "br x16",
        "3:",
        "mov x0, #0",
        "ret",
        hooked = sym dlsym_hooked,
        real = sym REAL_DLSYM,
        resolve = sym real_dlsym_ptr,
    )
}

/// Elsewhere: a plain wrapper (`RTLD_NEXT` resolves relative to us).
///
/// # Safety
/// Same contract as glibc's `dlsym`.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { dlsym_hooked(handle, name) }
}

/// `dlsym` for every handle but `RTLD_NEXT` (which the trampoline sends
/// straight to the real one): the real answer, or our hook for a symbol we
/// guard.
///
/// # Safety
/// Same contract as glibc's `dlsym`.
pub unsafe extern "C" fn dlsym_hooked(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    let Some(real) = real_dlsym() else {
        return std::ptr::null_mut();
    };
    // SAFETY: forwarding the caller's arguments unchanged.
    let p = unsafe { real(handle, name) };
    if p.is_null() || handle == libc::RTLD_NEXT || control_disabled() {
        return p;
    }
    match find_hook(name) {
        Some(h) => h.hook as *mut c_void,
        None => p,
    }
}

fn env_path(var: &std::ffi::CStr) -> *const c_char {
    // SAFETY: NUL-terminated name.
    unsafe { libc::getenv(var.as_ptr()) }
}

fn open(slot: &AtomicPtr<c_void>, env: &std::ffi::CStr, default: &std::ffi::CStr) -> *mut c_void {
    let h = slot.load(Acquire);
    if !h.is_null() {
        return h;
    }
    let mut path = env_path(env);
    // SAFETY: getenv result is NUL-terminated when non-null.
    if path.is_null() || unsafe { *path } == 0 {
        path = default.as_ptr();
    }
    // SAFETY: NUL-terminated path. Opening twice only bumps a refcount.
    let h = unsafe { libc::dlopen(path, libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: `path` is NUL-terminated (getenv or a C string literal).
        let shown = unsafe { std::ffi::CStr::from_ptr(path) };
        hlog!(
            crate::log::ERROR,
            "cannot open {} (set {} to its path)",
            shown.to_string_lossy(),
            env.to_string_lossy()
        );
        return h;
    }
    match slot.compare_exchange(std::ptr::null_mut(), h, AcqRel, Acquire) {
        Ok(_) => h,
        Err(existing) => {
            // SAFETY: dropping our extra reference.
            unsafe { libc::dlclose(h) };
            existing
        }
    }
}

/// Handle of the real `libcuda.so.1` (`HAMI_REAL_LIBCUDA` overrides the path).
pub(crate) fn cuda() -> *mut c_void {
    open(&CUDA, c"HAMI_REAL_LIBCUDA", c"libcuda.so.1")
}

/// Handle of the real `libnvidia-ml.so.1` (`HAMI_REAL_LIBNVML` overrides).
pub(crate) fn nvml() -> *mut c_void {
    open(&NVML, c"HAMI_REAL_LIBNVML", c"libnvidia-ml.so.1")
}

/// The real library's own `name` (NUL-terminated bytes), bypassing our hooks.
pub(crate) fn lib_sym(lib: Lib, name: &[u8]) -> *mut c_void {
    let h = match lib {
        Lib::Cuda => cuda(),
        Lib::Nvml => nvml(),
    };
    match (real_dlsym(), h.is_null()) {
        // SAFETY: valid handle and NUL-terminated name.
        (Some(real), false) => unsafe { real(h, name.as_ptr().cast()) },
        _ => std::ptr::null_mut(),
    }
}

/// The real function behind a hook, resolved once and cached in `slot`.
#[inline]
pub(crate) fn resolve(slot: &AtomicPtr<c_void>, name: &[u8], lib: Lib) -> *mut c_void {
    let p = slot.load(Acquire);
    if !p.is_null() {
        return p;
    }
    let p = lib_sym(lib, name);
    if !p.is_null() {
        slot.store(p, Release);
    }
    p
}
