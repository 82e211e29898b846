//! Added cost of the interposer per call, against the simulated driver:
//! `cuLaunchKernel` (no pacing needed: the fast path) and a
//! `cuMemAlloc_v2` + `cuMemFree_v2` pair (under a memory limit, so the
//! shared-region admission runs), each called directly on libsim_gpu.so and
//! through libvgpu.so's hook. The difference of the medians is the added ns.
//!
//! Run: `cargo bench -p hami-core --bench intercept`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::ffi::{CString, c_int, c_uint, c_void};
use std::sync::OnceLock;

type Launch = unsafe extern "C" fn(
    usize,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    usize,
    usize,
    usize,
) -> c_int;
type Alloc = unsafe extern "C" fn(*mut u64, usize) -> c_int;
type Free = unsafe extern "C" fn(u64) -> c_int;

struct Fns {
    launch: Launch,
    alloc: Alloc,
    free: Free,
}

fn load(path: &std::path::Path) -> Fns {
    let c = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: loading a library we built; symbols have the stated signatures.
    unsafe {
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        assert!(!h.is_null(), "dlopen {}", path.display());
        let sym = |n: &std::ffi::CStr| {
            let p = libc::dlsym(h, n.as_ptr());
            assert!(!p.is_null(), "{n:?}");
            p
        };
        Fns {
            launch: std::mem::transmute::<*mut c_void, Launch>(sym(c"cuLaunchKernel")),
            alloc: std::mem::transmute::<*mut c_void, Alloc>(sym(c"cuMemAlloc_v2")),
            free: std::mem::transmute::<*mut c_void, Free>(sym(c"cuMemFree_v2")),
        }
    }
}

fn fns() -> &'static (Fns, Fns) {
    static F: OnceLock<(Fns, Fns)> = OnceLock::new();
    F.get_or_init(|| {
        let a = common::artifacts();
        let sim = load(&a.sim);
        let vgpu = load(&a.vgpu);
        (sim, vgpu)
    })
}

fn main() {
    let scratch = std::env::temp_dir().join(format!("hami-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let a = common::artifacts();
    // SAFETY: single-threaded, before anything reads the environment.
    unsafe {
        std::env::set_var("HAMI_REAL_LIBCUDA", &a.sim);
        // The interposer asks NVML for its host pid at the first allocation.
        std::env::set_var("HAMI_REAL_LIBNVML", &a.sim);
        std::env::set_var(
            "CUDA_DEVICE_MEMORY_SHARED_CACHE",
            scratch.join("bench.cache"),
        );
        std::env::set_var("HAMI_LIMITS_FILE", scratch.join("no-limits-file"));
        std::env::set_var("CUDA_DEVICE_MEMORY_LIMIT", "8g");
        std::env::set_var("SIM_GPU_DEVICES", "16g 80 GPU-bench Sim");
    }
    fns();
    divan::main();
    let _ = std::fs::remove_dir_all(&scratch);
}

fn launch(f: Launch) -> c_int {
    // A zero-block grid: the simulated device does no work, so only the
    // call path is timed.
    // SAFETY: the driver signature; arguments valid for the simulation.
    unsafe { f(0x5100_0001, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0) }
}

fn alloc_free(alloc: Alloc, free: Free) -> c_int {
    let mut p = 0u64;
    // SAFETY: valid out pointer; freeing what we allocated.
    unsafe {
        let r = alloc(&mut p, 1 << 20);
        free(p) | r
    }
}

#[divan::bench(sample_count = 1000, sample_size = 64)]
fn launch_direct() -> c_int {
    launch(fns().0.launch)
}

#[divan::bench(sample_count = 1000, sample_size = 64)]
fn launch_interposed() -> c_int {
    launch(fns().1.launch)
}

#[divan::bench(sample_count = 1000, sample_size = 64)]
fn alloc_free_direct() -> c_int {
    alloc_free(fns().0.alloc, fns().0.free)
}

#[divan::bench(sample_count = 1000, sample_size = 64)]
fn alloc_free_interposed() -> c_int {
    alloc_free(fns().1.alloc, fns().1.free)
}
