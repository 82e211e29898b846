//! `cuda-probe`: a scripted CUDA driver client for the interposer's tests
//! and benchmarks. It loads `libcuda.so.1` (and `libnvidia-ml.so.1`) the way
//! programs do, runs the commands given as arguments and prints one line per
//! command: `<command> <CUresult> [values...]`.
//!
//! `HAMI_PROBE_RESOLVE` picks how entry points are found: `dlsym` (default;
//! `dlsym` on the library handle, like the CUDA runtime's first step),
//! `procaddr` (`cuGetProcAddress_v2`, like the CUDA runtime since 12.0, with
//! per-thread default streams when `HAMI_PROBE_PTDS=1`) or `default`
//! (`dlsym(RTLD_DEFAULT)`, what a program linked against libcuda gets).
//! `HAMI_PROBE_CUDA_VERSION` is the version asked of `cuGetProcAddress`
//! (default 12040).

use std::ffi::{CString, c_char, c_int, c_uint, c_void};
use std::io::Write;

struct Api {
    lib: *mut c_void,
    nvml: *mut c_void,
    mode: String,
    ptds: bool,
}

type Gpa2 = unsafe extern "C" fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> c_int;

/// Base name for `cuGetProcAddress`: the symbol without `_v2`/`_ptsz`.
fn base(sym: &str) -> &str {
    sym.trim_end_matches("_ptsz").trim_end_matches("_v2")
}

impl Api {
    fn sym(&self, name: &str) -> *mut c_void {
        let c = CString::new(name).expect("no NUL");
        // SAFETY: valid handles and names.
        unsafe {
            match self.mode.as_str() {
                "default" => libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()),
                "procaddr" if name.starts_with("cu") && name != "cuGetProcAddress_v2" => {
                    let gpa = self.sym("cuGetProcAddress_v2");
                    assert!(!gpa.is_null(), "no cuGetProcAddress_v2");
                    let gpa: Gpa2 = std::mem::transmute(gpa);
                    let b = CString::new(base(name)).expect("no NUL");
                    let mut p = std::ptr::null_mut();
                    let flags = if self.ptds { 2 } else { 0 };
                    let version = std::env::var("HAMI_PROBE_CUDA_VERSION")
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(12040);
                    gpa(b.as_ptr(), &mut p, version, flags, std::ptr::null_mut());
                    p
                }
                _ if name.starts_with("nvml") => libc::dlsym(self.nvml, c.as_ptr()),
                _ => libc::dlsym(self.lib, c.as_ptr()),
            }
        }
    }

    fn f<T: Copy>(&self, name: &str) -> T {
        let p = self.sym(name);
        assert!(!p.is_null(), "cuda-probe: {name} not found");
        assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
        // SAFETY: T is a function pointer type matching the symbol.
        unsafe { std::mem::transmute_copy(&p) }
    }
}

macro_rules! call {
    ($api:expr, $name:expr, fn($($t:ty),* $(,)?) $(-> $r:ty)? $(, $arg:expr)* $(,)?) => {{
        let f: unsafe extern "C" fn($($t),*) -> c_int = $api.f($name);
        // SAFETY: the driver signature of that name.
        unsafe { f($($arg),*) }
    }};
}

fn main() {
    let mode = std::env::var("HAMI_PROBE_RESOLVE").unwrap_or_else(|_| "dlsym".into());
    let ptds = std::env::var("HAMI_PROBE_PTDS").is_ok_and(|v| v == "1");
    // SAFETY: loading the driver by its soname, as programs do.
    let lib = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    assert!(!lib.is_null(), "cuda-probe: cannot dlopen libcuda.so.1");
    // SAFETY: as above.
    let nvml = unsafe {
        libc::dlopen(
            c"libnvidia-ml.so.1".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_GLOBAL,
        )
    };
    let api = Api {
        lib,
        nvml,
        mode,
        ptds,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut ptrs: Vec<u64> = Vec::new();
    let mut i = 0;
    let out = std::io::stdout();
    let num = |i: usize| -> u64 {
        let s = args
            .get(i)
            .unwrap_or_else(|| panic!("missing argument {i}"));
        hami_shm::size::parse_size(s).unwrap_or_else(|e| panic!("{e}"))
    };
    while i < args.len() {
        let cmd = args[i].as_str();
        let line;
        let push = |rc: c_int, p: u64, ptrs: &mut Vec<u64>| {
            if rc == 0 {
                ptrs.push(p);
            }
            format!("{cmd} {rc} {}", ptrs.len().wrapping_sub(1))
        };
        match cmd {
            "init" => {
                let rc = call!(api, "cuInit", fn(c_uint), 0);
                let mut ctx = 0usize;
                call!(
                    api,
                    "cuDevicePrimaryCtxRetain",
                    fn(*mut usize, c_int),
                    &mut ctx,
                    0
                );
                call!(api, "cuCtxSetCurrent", fn(usize), ctx);
                if !api.nvml.is_null() {
                    call!(api, "nvmlInit_v2", fn(),);
                }
                line = format!("init {rc}");
            }
            "dev" => {
                let d = num(i + 1) as c_int;
                i += 1;
                let mut ctx = 0usize;
                let rc = call!(
                    api,
                    "cuDevicePrimaryCtxRetain",
                    fn(*mut usize, c_int),
                    &mut ctx,
                    d
                );
                call!(api, "cuCtxSetCurrent", fn(usize), ctx);
                line = format!("dev {rc}");
            }
            "alloc" | "managed" | "async" | "pool" | "vmm" | "extmem" => {
                let size = num(i + 1) as usize;
                i += 1;
                let mut p = 0u64;
                let rc = match cmd {
                    "alloc" => call!(api, "cuMemAlloc_v2", fn(*mut u64, usize), &mut p, size),
                    "managed" => call!(
                        api,
                        "cuMemAllocManaged",
                        fn(*mut u64, usize, c_uint),
                        &mut p,
                        size,
                        1
                    ),
                    "async" => call!(
                        api,
                        if api.ptds {
                            "cuMemAllocAsync_ptsz"
                        } else {
                            "cuMemAllocAsync"
                        },
                        fn(*mut u64, usize, usize),
                        &mut p,
                        size,
                        0
                    ),
                    "pool" => {
                        let mut pool = 0usize;
                        call!(
                            api,
                            "cuDeviceGetDefaultMemPool",
                            fn(*mut usize, c_int),
                            &mut pool,
                            0
                        );
                        call!(
                            api,
                            "cuMemAllocFromPoolAsync",
                            fn(*mut u64, usize, usize, usize),
                            &mut p,
                            size,
                            pool,
                            0
                        )
                    }
                    "vmm" => {
                        // CUmemAllocationProp: pinned, no handle types, device 0.
                        let prop: [c_int; 8] = [1, 0, 1, 0, 0, 0, 0, 0];
                        call!(
                            api,
                            "cuMemCreate",
                            fn(*mut u64, usize, *const c_int, u64),
                            &mut p,
                            size,
                            prop.as_ptr(),
                            0
                        )
                    }
                    _ => {
                        // CUDA_EXTERNAL_MEMORY_HANDLE_DESC: opaque fd, size.
                        let mut desc = [0u64; 13];
                        desc[0] = 1;
                        desc[3] = size as u64;
                        call!(
                            api,
                            "cuImportExternalMemory",
                            fn(*mut u64, *const u64),
                            &mut p,
                            desc.as_ptr()
                        )
                    }
                };
                line = push(rc, p, &mut ptrs);
            }
            "pitch" => {
                let (w, h) = (num(i + 1) as usize, num(i + 2) as usize);
                i += 2;
                let (mut p, mut pitch) = (0u64, 0usize);
                let rc = call!(
                    api,
                    "cuMemAllocPitch_v2",
                    fn(*mut u64, *mut usize, usize, usize, c_uint),
                    &mut p,
                    &mut pitch,
                    w,
                    h,
                    4
                );
                line = format!("{} {pitch}", push(rc, p, &mut ptrs));
            }
            "array" | "array3d" | "mipmap" => {
                let (w, h, z) = (
                    num(i + 1) as usize,
                    num(i + 2) as usize,
                    num(i + 3) as usize,
                );
                i += 3;
                let mut p = 0u64;
                let rc = match cmd {
                    "array" => {
                        // CUDA_ARRAY_DESCRIPTOR, float x 1 channel; z unused.
                        let d: (usize, usize, c_uint, c_uint) = (w, h, 0x20, 1);
                        call!(
                            api,
                            "cuArrayCreate_v2",
                            fn(*mut u64, *const (usize, usize, c_uint, c_uint)),
                            &mut p,
                            &d
                        )
                    }
                    "array3d" => {
                        let d: [usize; 5] = [w, h, z, 0x20 | (1 << 32), 0];
                        call!(
                            api,
                            "cuArray3DCreate_v2",
                            fn(*mut u64, *const usize),
                            &mut p,
                            d.as_ptr()
                        )
                    }
                    _ => {
                        let d: [usize; 5] = [w, h, 0, 0x20 | (1 << 32), 0];
                        call!(
                            api,
                            "cuMipmappedArrayCreate",
                            fn(*mut u64, *const usize, c_uint),
                            &mut p,
                            d.as_ptr(),
                            z as c_uint
                        )
                    }
                };
                line = push(rc, p, &mut ptrs);
            }
            "free" | "free-async" | "vmm-release" | "array-destroy" | "mipmap-destroy"
            | "extmem-destroy" | "ipc-close" | "graph-destroy" => {
                let k = num(i + 1) as usize;
                i += 1;
                let p = ptrs.get(k).copied().unwrap_or(0xdead_0000);
                let rc = match cmd {
                    "free" => call!(api, "cuMemFree_v2", fn(u64), p),
                    "free-async" => call!(api, "cuMemFreeAsync", fn(u64, usize), p, 0),
                    "vmm-release" => call!(api, "cuMemRelease", fn(u64), p),
                    "array-destroy" => call!(api, "cuArrayDestroy", fn(u64), p),
                    "mipmap-destroy" => call!(api, "cuMipmappedArrayDestroy", fn(u64), p),
                    "extmem-destroy" => call!(api, "cuDestroyExternalMemory", fn(u64), p),
                    "ipc-close" => call!(api, "cuIpcCloseMemHandle", fn(u64), p),
                    _ => call!(api, "cuGraphDestroy", fn(u64), p),
                };
                line = format!("{cmd} {rc}");
            }
            "ipc-get" => {
                let k = num(i + 1) as usize;
                i += 1;
                let mut h = [0u8; 64];
                let rc = call!(
                    api,
                    "cuIpcGetMemHandle",
                    fn(*mut [u8; 64], u64),
                    &mut h,
                    ptrs[k]
                );
                let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
                line = format!("ipc-get {rc} {hex}");
            }
            "ipc-open" => {
                let hex = &args[i + 1];
                i += 1;
                let mut h = [0u8; 64];
                for (j, b) in h.iter_mut().enumerate() {
                    *b = u8::from_str_radix(&hex[2 * j..2 * j + 2], 16).expect("hex");
                }
                let mut p = 0u64;
                let rc = call!(
                    api,
                    "cuIpcOpenMemHandle_v2",
                    fn(*mut u64, [u8; 64], c_uint),
                    &mut p,
                    h,
                    1
                );
                line = push(rc, p, &mut ptrs);
            }
            "graph-mem" => {
                let size = num(i + 1) as usize;
                i += 1;
                let mut g = 0u64;
                call!(api, "cuGraphCreate", fn(*mut u64, c_uint), &mut g, 0);
                // CUDA_MEM_ALLOC_NODE_PARAMS: pool props (device 0), no access descs, size.
                let mut prm = [0u64; 15];
                prm[0] = 1; // pinned allocation, no handle types
                prm[1] = 1;
                prm[13] = size as u64;
                let mut node = 0u64;
                let rc = call!(
                    api,
                    "cuGraphAddMemAllocNode",
                    fn(*mut u64, u64, *const u64, usize, *mut u64),
                    &mut node,
                    g,
                    std::ptr::null(),
                    0,
                    prm.as_mut_ptr()
                );
                line = push(rc, g, &mut ptrs);
            }
            "meminfo" => {
                let (mut free, mut total) = (0usize, 0usize);
                let rc = call!(
                    api,
                    "cuMemGetInfo_v2",
                    fn(*mut usize, *mut usize),
                    &mut free,
                    &mut total
                );
                line = format!("meminfo {rc} {free} {total}");
            }
            "totalmem" => {
                let d = num(i + 1) as c_int;
                i += 1;
                let mut b = 0usize;
                let rc = call!(api, "cuDeviceTotalMem_v2", fn(*mut usize, c_int), &mut b, d);
                line = format!("totalmem {rc} {b}");
            }
            "nvml-mem" | "nvml-mem2" => {
                let d = num(i + 1) as c_uint;
                i += 1;
                let mut h = 0usize;
                call!(
                    api,
                    "nvmlDeviceGetHandleByIndex_v2",
                    fn(c_uint, *mut usize),
                    d,
                    &mut h
                );
                let mut m = [0u64; 5];
                let rc = if cmd == "nvml-mem" {
                    let rc = call!(
                        api,
                        "nvmlDeviceGetMemoryInfo",
                        fn(usize, *mut u64),
                        h,
                        m.as_mut_ptr()
                    );
                    m = [0, m[0], 0, m[1], m[2]];
                    rc
                } else {
                    m[0] = 2 << 24 | 40;
                    call!(
                        api,
                        "nvmlDeviceGetMemoryInfo_v2",
                        fn(usize, *mut u64),
                        h,
                        m.as_mut_ptr()
                    )
                };
                line = format!("{cmd} {rc} {} {} {}", m[1], m[3], m[4]);
            }
            "nvml-util" => {
                let d = num(i + 1) as c_uint;
                i += 1;
                let mut h = 0usize;
                call!(
                    api,
                    "nvmlDeviceGetHandleByIndex_v2",
                    fn(c_uint, *mut usize),
                    d,
                    &mut h
                );
                let mut u = [0u32; 2];
                let rc = call!(
                    api,
                    "nvmlDeviceGetUtilizationRates",
                    fn(usize, *mut [u32; 2]),
                    h,
                    &mut u
                );
                line = format!("nvml-util {rc} {}", u[0]);
            }
            "nvml-procs" => {
                let d = num(i + 1) as c_uint;
                i += 1;
                let mut h = 0usize;
                call!(
                    api,
                    "nvmlDeviceGetHandleByIndex_v2",
                    fn(c_uint, *mut usize),
                    d,
                    &mut h
                );
                let mut n: c_uint = 16;
                let mut infos = [[0u64; 3]; 16];
                let rc = call!(
                    api,
                    "nvmlDeviceGetComputeRunningProcesses_v3",
                    fn(usize, *mut c_uint, *mut [u64; 3]),
                    h,
                    &mut n,
                    infos.as_mut_ptr()
                );
                let pids: Vec<String> = infos[..n as usize]
                    .iter()
                    .map(|e| (e[0] as u32).to_string())
                    .collect();
                line = format!("nvml-procs {rc} {n} {}", pids.join(","));
            }
            "launch" | "launch-ex" | "launch-coop" | "graph-launch" | "busy" => {
                // busy <ms> <us per kernel>: launch back to back for that long.
                let (a, us) = (num(i + 1), num(i + 2));
                i += 2;
                let t0 = std::time::Instant::now();
                let mono0 = hami_shm::region::monotonic_ns();
                // A CPU-starvation meter: a thread that sleeps 1 ms at a time
                // and adds up how late it wakes beyond 1 ms of slack. On a
                // busy machine the probe (and the pacer in it) is late by
                // about as much, and the card idles meanwhile.
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let meter = {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let mut late = 0u64;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let t = std::time::Instant::now();
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            late += (t.elapsed().as_nanos() as u64).saturating_sub(2_000_000);
                        }
                        late
                    })
                };
                let mut n = 0u64;
                let mut rc = 0;
                let f = 0x5100_0001usize;
                let suffix = if api.ptds { "_ptsz" } else { "" };
                let go = |n: u64| {
                    (cmd == "busy" && t0.elapsed().as_millis() < a as u128)
                        || (cmd != "busy" && n < a)
                };
                // The longest wait between two launches (CLOCK_MONOTONIC
                // start and end), e.g. a launch held by the priority gate.
                let (mut prev, mut gap) = (mono0, (0u64, 0u64));
                while go(n) {
                    rc = match cmd {
                        "launch-ex" => {
                            let cfg: [u64; 6] =
                                [us | (1 << 32), 1 | (1 << 32), 1 | (1 << 32), 0, 0, 0];
                            call!(
                                api,
                                if suffix.is_empty() {
                                    "cuLaunchKernelEx"
                                } else {
                                    "cuLaunchKernelEx_ptsz"
                                },
                                fn(*const u64, usize, usize, usize),
                                cfg.as_ptr(),
                                f,
                                0,
                                0
                            )
                        }
                        "launch-coop" => call!(
                            api,
                            "cuLaunchCooperativeKernel",
                            fn(
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
                            ),
                            f,
                            us as c_uint,
                            1,
                            1,
                            1,
                            1,
                            1,
                            0,
                            0,
                            0
                        ),
                        "graph-launch" => call!(api, "cuGraphLaunch", fn(usize, usize), 0x77, 0),
                        _ if api.ptds => call!(
                            api,
                            "cuLaunchKernel_ptsz",
                            fn(
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
                            ),
                            f,
                            us as c_uint,
                            1,
                            1,
                            1,
                            1,
                            1,
                            0,
                            0,
                            0,
                            0
                        ),
                        _ => call!(
                            api,
                            "cuLaunchKernel",
                            fn(
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
                            ),
                            f,
                            us as c_uint,
                            1,
                            1,
                            1,
                            1,
                            1,
                            0,
                            0,
                            0,
                            0
                        ),
                    };
                    if rc != 0 {
                        break;
                    }
                    let now = hami_shm::region::monotonic_ns();
                    if n > 0 && now - prev > gap.1 - gap.0 {
                        gap = (prev, now);
                    }
                    prev = now;
                    n += 1;
                    // A steady stream, like a training loop: wait for the
                    // device every 8 launches so work never piles up.
                    if n.is_multiple_of(8) {
                        call!(api, "cuCtxSynchronize", fn());
                    }
                }
                call!(api, "cuCtxSynchronize", fn(),);
                // Also CLOCK_MONOTONIC at the start and the end, so runs of
                // several processes can be put on one time line, and the
                // starvation meter's ns.
                let (elapsed, mono1) = (t0.elapsed().as_nanos(), hami_shm::region::monotonic_ns());
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                let late = meter.join().unwrap_or(0);
                line = format!(
                    "{cmd} {rc} {n} {elapsed} {mono0} {mono1} {late} {} {}",
                    gap.0, gap.1
                );
            }
            "pool-keep" | "trim" => {
                // pool-keep: the default pool keeps freed memory (threshold
                // = max); trim <bytes>: cuMemPoolTrimTo on it.
                let mut pool = 0usize;
                call!(
                    api,
                    "cuDeviceGetDefaultMemPool",
                    fn(*mut usize, c_int),
                    &mut pool,
                    0
                );
                let rc = if cmd == "trim" {
                    let keep = num(i + 1) as usize;
                    i += 1;
                    call!(api, "cuMemPoolTrimTo", fn(usize, usize), pool, keep)
                } else {
                    let max = u64::MAX;
                    call!(
                        api,
                        "cuMemPoolSetAttribute",
                        fn(usize, c_int, *const u64),
                        pool,
                        4,
                        &max
                    )
                };
                line = format!("{cmd} {rc}");
            }
            "ctx-destroy" => {
                // ctx-destroy: destroys the current context (the driver
                // frees everything allocated in it).
                let mut ctx = 0usize;
                call!(api, "cuCtxGetCurrent", fn(*mut usize), &mut ctx);
                line = format!(
                    "ctx-destroy {}",
                    call!(api, "cuCtxDestroy_v2", fn(usize), ctx)
                );
            }
            "ctx-reset" => {
                // ctx-reset: resets the current device's primary context.
                let mut d: c_int = 0;
                call!(api, "cuCtxGetDevice", fn(*mut c_int), &mut d);
                line = format!(
                    "ctx-reset {}",
                    call!(api, "cuDevicePrimaryCtxReset_v2", fn(c_int), d)
                );
            }
            "threads" => {
                // threads <n> <size> <count>: n threads of this process each
                // allocate and free two buffers <count> times, then keep one.
                let (n, size, count) = (num(i + 1), num(i + 2) as usize, num(i + 3));
                i += 3;
                type Alloc = unsafe extern "C" fn(*mut u64, usize) -> c_int;
                type Free = unsafe extern "C" fn(u64) -> c_int;
                type SetCtx = unsafe extern "C" fn(usize) -> c_int;
                let (alloc, free, set): (Alloc, Free, SetCtx) = (
                    api.f("cuMemAlloc_v2"),
                    api.f("cuMemFree_v2"),
                    api.f("cuCtxSetCurrent"),
                );
                let mut ctx = 0usize;
                call!(api, "cuCtxGetCurrent", fn(*mut usize), &mut ctx);
                let go = std::sync::Barrier::new(n as usize);
                let failed: u64 = std::thread::scope(|sc| {
                    let hs: Vec<_> = (0..n)
                        .map(|_| {
                            let go = &go;
                            sc.spawn(move || {
                                // SAFETY: the driver's entry points, valid arguments.
                                unsafe {
                                    set(ctx);
                                    go.wait();
                                    let mut bad = 0u64;
                                    for _ in 0..count {
                                        let (mut a, mut b) = (0u64, 0u64);
                                        bad += u64::from(alloc(&mut a, size) != 0);
                                        bad += u64::from(alloc(&mut b, size) != 0);
                                        bad += u64::from(free(a) != 0);
                                        bad += u64::from(free(b) != 0);
                                    }
                                    let mut keep = 0u64;
                                    bad += u64::from(alloc(&mut keep, size) != 0);
                                    bad
                                }
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap_or(1)).sum()
                });
                line = format!("threads 0 {failed}");
            }
            "fork-threads" => {
                // fork-threads <size> <threads>: the child's threads all
                // allocate at once, right after the fork; the parent waits.
                let (size, n) = (num(i + 1) as usize, num(i + 2) as usize);
                i += 2;
                type Alloc = unsafe extern "C" fn(*mut u64, usize) -> c_int;
                let alloc: Alloc = api.f("cuMemAlloc_v2");
                out.lock().flush().ok();
                // SAFETY: the child only calls the driver through the interposer and exits.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    let go = std::sync::Barrier::new(n);
                    let ok: usize = std::thread::scope(|sc| {
                        let hs: Vec<_> = (0..n)
                            .map(|_| {
                                let go = &go;
                                sc.spawn(move || {
                                    go.wait();
                                    let mut p = 0u64;
                                    // SAFETY: the driver's entry point, valid arguments.
                                    usize::from(unsafe { alloc(&mut p, size) } == 0)
                                })
                            })
                            .collect();
                        hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
                    });
                    println!("child-threads 0 {ok}");
                    std::io::stdout().flush().ok();
                    // SAFETY: leave without running the parent's atexit handlers.
                    unsafe { libc::_exit(0) };
                }
                let mut status = 0;
                // SAFETY: waiting for our child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                line = format!("fork-threads 0 {status}");
            }
            "wait-flag" => {
                // wait-flag: a kernel that waits for a flag (stream 1), then
                // the later launch that sets it (stream 2), then a sync.
                let (mut s1, mut s2) = (0usize, 0usize);
                call!(api, "cuStreamCreate", fn(*mut usize, c_uint), &mut s1, 1);
                call!(api, "cuStreamCreate", fn(*mut usize, c_uint), &mut s2, 1);
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
                let launch: Launch = api.f("cuLaunchKernel");
                // SAFETY: the driver's entry point, valid arguments.
                let (a, b) = unsafe {
                    (
                        launch(0x5700_0001, 1, 1, 1, 1, 1, 1, 0, s1, 0, 0),
                        launch(0x5300_0001, 1, 1, 1, 1, 1, 1, 0, s2, 0, 0),
                    )
                };
                let rc = call!(api, "cuCtxSynchronize", fn());
                line = format!("wait-flag {} {a} {b}", a | b | rc);
            }
            "dlsym-next" => {
                // dlsym-next <symbol>: calls `int symbol(void)` found with
                // dlsym(RTLD_DEFAULT) (a preloaded test library's).
                let name = CString::new(args[i + 1].as_str()).expect("no NUL");
                i += 1;
                // SAFETY: NUL-terminated name.
                let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                line = if p.is_null() {
                    "dlsym-next 500 0".into()
                } else {
                    // SAFETY: the test library's `int symbol(void)`.
                    let f: unsafe extern "C" fn() -> c_int = unsafe { std::mem::transmute(p) };
                    // SAFETY: as above.
                    format!("dlsym-next 0 {}", unsafe { f() })
                };
            }
            "sync" => line = format!("sync {}", call!(api, "cuCtxSynchronize", fn())),
            "exec" => {
                // exec <commands...>: replace this image with a new probe.
                use std::os::unix::process::CommandExt;
                out.lock().flush().ok();
                let e = std::process::Command::new(std::env::current_exe().expect("own path"))
                    .args(&args[i + 1..])
                    .exec();
                panic!("exec failed: {e}");
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_millis(num(i + 1)));
                i += 1;
                line = "sleep 0".into();
            }
            "ready" => line = format!("ready 0 {}", std::process::id()),
            "wait-path" => {
                // wait-path <path> <ms>: blocks until the path exists (a
                // go-ahead from outside the container, e.g. through a
                // hostPath volume), for at most <ms>; 1 when it never came.
                let (path, ms) = (std::path::Path::new(args[i + 1].as_str()), num(i + 2));
                i += 2;
                let t0 = std::time::Instant::now();
                while !path.exists() && t0.elapsed().as_millis() < ms as u128 {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                line = format!("wait-path {}", u8::from(!path.exists()));
            }
            "await" => {
                // await: blocks until a line arrives on stdin (the test's
                // go-ahead, sent after it changed something); `await 1` if
                // stdin ended instead.
                let mut go = String::new();
                let n = std::io::stdin().read_line(&mut go).unwrap_or(0);
                line = format!("await {}", u8::from(n == 0));
            }
            "alloc-until" => {
                // alloc-until <size> <ms>: cuMemAlloc every 10 ms until it
                // succeeds, for at most <ms>; prints the last result, the
                // index and the number of tries (for limits that change
                // while the program runs and take effect at a later call).
                let (size, ms) = (num(i + 1) as usize, num(i + 2));
                i += 2;
                let t0 = std::time::Instant::now();
                let mut tries = 0u64;
                let (rc, p) = loop {
                    let mut p = 0u64;
                    tries += 1;
                    let rc = call!(api, "cuMemAlloc_v2", fn(*mut u64, usize), &mut p, size);
                    if rc == 0 || t0.elapsed().as_millis() >= ms as u128 {
                        break (rc, p);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                };
                line = format!("{} {tries}", push(rc, p, &mut ptrs));
            }
            "hold" => loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            },
            "churn" => {
                // churn <size> <count>: allocate and free, over and over.
                let (size, count) = (num(i + 1) as usize, num(i + 2));
                i += 2;
                let (mut ok, mut oom) = (0, 0);
                for _ in 0..count {
                    let mut p = 0u64;
                    match call!(api, "cuMemAlloc_v2", fn(*mut u64, usize), &mut p, size) {
                        0 => {
                            ok += 1;
                            call!(api, "cuMemFree_v2", fn(u64), p);
                        }
                        _ => oom += 1,
                    }
                }
                line = format!("churn 0 {ok} {oom}");
            }
            "fork" => {
                // fork <size>: the child allocates and reports, the parent waits.
                let size = num(i + 1) as usize;
                i += 1;
                out.lock().flush().ok();
                // SAFETY: the child only calls the driver through the interposer and exits.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    let mut p = 0u64;
                    let rc = call!(api, "cuMemAlloc_v2", fn(*mut u64, usize), &mut p, size);
                    let mut free = 0usize;
                    let mut total = 0usize;
                    call!(
                        api,
                        "cuMemGetInfo_v2",
                        fn(*mut usize, *mut usize),
                        &mut free,
                        &mut total
                    );
                    println!("child {rc} {free} {total}");
                    std::io::stdout().flush().ok();
                    // SAFETY: leave without running the parent's atexit handlers.
                    unsafe { libc::_exit(0) };
                }
                let mut status = 0;
                // SAFETY: waiting for our child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                line = format!("fork 0 {status}");
            }
            other => panic!("cuda-probe: unknown command {other:?}"),
        }
        let mut o = out.lock();
        writeln!(o, "{line}").ok();
        o.flush().ok();
        i += 1;
    }
}
