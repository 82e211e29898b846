//! Every guarded entry point, declared once: the exported hook, the cached
//! real function and the table the `dlsym` and `cuGetProcAddress` paths use.
//!
//! Each hook resolves the real function, forwards untouched when control is
//! disabled, and otherwise runs its implementation under `catch_unwind`, so
//! a bug of ours becomes `CUDA_ERROR_UNKNOWN` instead of an abort.

use crate::dl::{Hook, Lib};
use crate::ffi::*;
use std::ffi::{c_char, c_int, c_uint, c_void};

/// Runs `f`, turning a panic into `err`.
#[inline(always)]
pub(crate) fn guard<R>(err: R, f: impl FnOnce() -> R) -> R {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(err)
}

macro_rules! hooks {
    ($table:ident, $list:ident, $lib:expr, $ret:ty, $uninit:expr, $fail:expr;
     $( $name:ident ( $($arg:ident : $ty:ty),* $(,)? ) => $imp:path; )*) => {
        /// The real functions behind the hooks, resolved on first use.
        #[allow(non_upper_case_globals)]
        pub(crate) mod $table {
            use std::sync::atomic::AtomicPtr;
            $( pub(crate) static $name: AtomicPtr<std::ffi::c_void> =
                AtomicPtr::new(std::ptr::null_mut()); )*
        }

        $(
            /// Hook; see the implementation it names.
            ///
            /// # Safety
            /// Same contract as the real entry point of this name.
            #[unsafe(no_mangle)]
            #[allow(non_snake_case, clippy::too_many_arguments)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
                type Real = unsafe extern "C" fn($($ty),*) -> $ret;
                let p = crate::dl::resolve(&$table::$name, concat!(stringify!($name), "\0").as_bytes(), $lib);
                if p.is_null() {
                    return $uninit;
                }
                // SAFETY: `p` is the real library's entry point of this very
                // name, whose C signature is `Real`.
                let real = unsafe { std::mem::transmute::<*mut c_void, Real>(p) };
                if crate::dl::control_disabled() {
                    // SAFETY: forwarding the caller's arguments unchanged.
                    return unsafe { real($($arg),*) };
                }
                // SAFETY: the implementation keeps the real function's contract.
                guard($fail, || unsafe { $imp(real, $($arg),*) })
            }
        )*

        pub(crate) static $list: &[Hook] = &[
            $( Hook {
                name: concat!(stringify!($name), "\0").as_bytes(),
                hook: $name as *const (),
                real: &$table::$name,
                lib: $lib,
            }, )*
        ];
    };
}

use crate::memory as mem;
use crate::nvml as nv;
use crate::pacing as pace;
use crate::procaddr as pa;

type Ptr = *mut u64;
type Stream = usize;

hooks! { real_cuda, CUDA_HOOKS, Lib::Cuda, CUresult, CUDA_ERROR_NOT_INITIALIZED, CUDA_ERROR_UNKNOWN;
    // Resolution.
    cuGetProcAddress(sym: *const c_char, pfn: *mut *mut c_void, ver: c_int, flags: u64) => pa::get_proc_address;
    cuGetProcAddress_v2(sym: *const c_char, pfn: *mut *mut c_void, ver: c_int, flags: u64, status: *mut c_int) => pa::get_proc_address_v2;
    // Linear, pitched and managed memory.
    cuMemAlloc_v2(p: Ptr, size: usize) => mem::alloc;
    cuMemAllocPitch_v2(p: Ptr, pitch: *mut usize, width: usize, height: usize, elem: c_uint) => mem::alloc_pitch;
    cuMemAllocManaged(p: Ptr, size: usize, flags: c_uint) => mem::alloc_managed;
    cuMemFree_v2(p: u64) => mem::free;
    // Stream-ordered allocation.
    cuMemAllocAsync(p: Ptr, size: usize, s: Stream) => mem::alloc_async;
    cuMemAllocAsync_ptsz(p: Ptr, size: usize, s: Stream) => mem::alloc_async;
    cuMemAllocFromPoolAsync(p: Ptr, size: usize, pool: usize, s: Stream) => mem::alloc_from_pool_async;
    cuMemAllocFromPoolAsync_ptsz(p: Ptr, size: usize, pool: usize, s: Stream) => mem::alloc_from_pool_async;
    cuMemFreeAsync(p: u64, s: Stream) => mem::free_async;
    cuMemFreeAsync_ptsz(p: u64, s: Stream) => mem::free_async;
    cuMemPoolTrimTo(pool: usize, keep: usize) => mem::pool_trim_to;
    // Virtual memory management.
    cuMemCreate(h: Ptr, size: usize, prop: *const MemAllocationProp, flags: u64) => mem::create;
    cuMemRelease(h: u64) => mem::release;
    // Arrays.
    cuArrayCreate_v2(a: Ptr, d: *const ArrayDescriptor) => mem::array_create;
    cuArray3DCreate_v2(a: Ptr, d: *const Array3dDescriptor) => mem::array3d_create;
    cuArrayDestroy(a: u64) => mem::array_destroy;
    cuMipmappedArrayCreate(a: Ptr, d: *const Array3dDescriptor, levels: c_uint) => mem::mipmap_create;
    cuMipmappedArrayDestroy(a: u64) => mem::mipmap_destroy;
    // Memory of other processes and other APIs.
    cuIpcOpenMemHandle(p: Ptr, h: IpcMemHandle, flags: c_uint) => mem::ipc_open;
    cuIpcOpenMemHandle_v2(p: Ptr, h: IpcMemHandle, flags: c_uint) => mem::ipc_open;
    cuIpcCloseMemHandle(p: u64) => mem::ipc_close;
    cuImportExternalMemory(m: Ptr, d: *const ExternalMemoryHandleDesc) => mem::import_external;
    cuDestroyExternalMemory(m: u64) => mem::destroy_external;
    cuGraphAddMemAllocNode(node: Ptr, graph: usize, deps: *const usize, n: usize, params: *mut MemAllocNodeParams) => mem::graph_add_mem_alloc_node;
    cuGraphDestroy(graph: usize) => mem::graph_destroy;
    // Contexts: destroying or resetting one frees what was allocated in it.
    cuCtxDestroy(ctx: usize) => mem::ctx_destroy;
    cuCtxDestroy_v2(ctx: usize) => mem::ctx_destroy;
    cuDevicePrimaryCtxReset(dev: c_int) => mem::primary_ctx_reset;
    cuDevicePrimaryCtxReset_v2(dev: c_int) => mem::primary_ctx_reset;
    // The container's view.
    cuMemGetInfo_v2(free: *mut usize, total: *mut usize) => mem::get_info;
    cuDeviceTotalMem_v2(bytes: *mut usize, dev: c_int) => mem::total_mem;
    // Launches.
    cuLaunchKernel(f: usize, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, s: Stream, params: *mut *mut c_void, extra: *mut *mut c_void) => pace::launch_kernel;
    cuLaunchKernel_ptsz(f: usize, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, s: Stream, params: *mut *mut c_void, extra: *mut *mut c_void) => pace::launch_kernel;
    cuLaunchKernelEx(cfg: *const LaunchConfig, f: usize, params: *mut *mut c_void, extra: *mut *mut c_void) => pace::launch_kernel_ex;
    cuLaunchKernelEx_ptsz(cfg: *const LaunchConfig, f: usize, params: *mut *mut c_void, extra: *mut *mut c_void) => pace::launch_kernel_ex;
    cuLaunchCooperativeKernel(f: usize, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, s: Stream, params: *mut *mut c_void) => pace::launch_cooperative;
    cuLaunchCooperativeKernel_ptsz(f: usize, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint, shmem: c_uint, s: Stream, params: *mut *mut c_void) => pace::launch_cooperative;
    cuGraphLaunch(exec: usize, s: Stream) => pace::graph_launch;
    cuGraphLaunch_ptsz(exec: usize, s: Stream) => pace::graph_launch;
}

hooks! { real_nvml, NVML_HOOKS, Lib::Nvml, NvmlReturn, NVML_ERROR_UNINITIALIZED, NVML_ERROR_UNKNOWN;
    nvmlDeviceGetMemoryInfo(dev: usize, m: *mut NvmlMemory) => nv::memory_info;
    nvmlDeviceGetMemoryInfo_v2(dev: usize, m: *mut NvmlMemoryV2) => nv::memory_info_v2;
    nvmlDeviceGetComputeRunningProcesses(dev: usize, n: *mut c_uint, p: *mut NvmlProcessInfoV1) => nv::processes_v1;
    nvmlDeviceGetComputeRunningProcesses_v2(dev: usize, n: *mut c_uint, p: *mut NvmlProcessInfo) => nv::processes;
    nvmlDeviceGetComputeRunningProcesses_v3(dev: usize, n: *mut c_uint, p: *mut NvmlProcessInfo) => nv::processes;
}

/// Every hook, CUDA then NVML.
pub(crate) fn all() -> impl Iterator<Item = &'static Hook> {
    CUDA_HOOKS.iter().chain(NVML_HOOKS.iter())
}

/// The CUDA hook exported as `symbol` (no NUL), if we guard it.
pub(crate) fn named(symbol: &str) -> Option<&'static Hook> {
    CUDA_HOOKS
        .iter()
        .find(|h| h.name.len() == symbol.len() + 1 && h.name.starts_with(symbol.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_the_error_value() {
        // Quiet the default hook's message for this deliberate panic.
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = guard(CUDA_ERROR_UNKNOWN, || -> CUresult {
            panic!("bug in a hook")
        });
        std::panic::set_hook(prev);
        assert_eq!(r, CUDA_ERROR_UNKNOWN);
        assert_eq!(guard(CUDA_ERROR_UNKNOWN, || CUDA_SUCCESS), CUDA_SUCCESS);
    }

    #[test]
    fn every_hook_name_is_unique_and_nul_terminated() {
        let names: Vec<&[u8]> = all().map(|h| h.name).collect();
        for (i, n) in names.iter().enumerate() {
            assert_eq!(n.last(), Some(&0));
            assert!(
                !names[..i].contains(n),
                "{:?} twice",
                String::from_utf8_lossy(n)
            );
        }
    }
}
