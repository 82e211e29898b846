//! An NVML client this project did not write, `nvml-wrapper` (what
//! hami-node uses), against the simulated `libnvidia-ml.so.1`: every call
//! finds its symbol, uses nvml.h's struct layouts and gets the values of
//! the device file (or `NotSupported` for what the simulation leaves out).
//!
//! Each test runs in a child process of this test binary, so that it has
//! its own device list and simulated cards (the simulation reads its env
//! once per process).

use nvml_wrapper::enum_wrappers::device::{
    Brand, Clock, ClockId, PerformanceState, TemperatureSensor, TemperatureThreshold, TopologyLevel,
};
use nvml_wrapper::enums::device::{DeviceArchitecture, UsedGpuMemory};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use nvml_wrapper_sys::bindings as ffi;
use std::ffi::{CStr, c_int, c_uint, c_void};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "../../hami-core/tests/common/mod.rs"]
mod common;

const GIB: u64 = 1 << 30;

/// The device file: `(memory, sms, uuid, name)`; cards 4-7 repeat 0-3.
const CARDS: [(u64, u32, &str, &str); 8] = [
    (
        8 * GIB,
        132,
        "GPU-aaaaaaaa-0000-4000-8000-000000000000",
        "NVIDIA H100 80GB HBM3",
    ),
    (
        4 * GIB,
        108,
        "GPU-aaaaaaaa-0000-4000-8000-000000000001",
        "NVIDIA A100-SXM4-40GB",
    ),
    (
        2 * GIB,
        58,
        "GPU-aaaaaaaa-0000-4000-8000-000000000002",
        "NVIDIA L4",
    ),
    (
        GIB,
        40,
        "GPU-aaaaaaaa-0000-4000-8000-000000000003",
        "Tesla T4",
    ),
    (
        8 * GIB,
        132,
        "GPU-aaaaaaaa-0000-4000-8000-000000000004",
        "NVIDIA H100 80GB HBM3",
    ),
    (
        4 * GIB,
        108,
        "GPU-aaaaaaaa-0000-4000-8000-000000000005",
        "NVIDIA A100-SXM4-40GB",
    ),
    (
        2 * GIB,
        58,
        "GPU-aaaaaaaa-0000-4000-8000-000000000006",
        "NVIDIA L4",
    ),
    (
        GIB,
        40,
        "GPU-aaaaaaaa-0000-4000-8000-000000000007",
        "Tesla T4",
    ),
];

fn device_file() -> String {
    CARDS
        .iter()
        .map(|(m, s, u, n)| format!("{}m {s} {u} {n}", m >> 20))
        .collect::<Vec<_>>()
        .join("\n")
}

const CHILD: &str = "HAMI_NVML_CLIENT_CHILD";
const LIB_DIR: &str = "HAMI_NVML_CLIENT_LIB_DIR";

/// In the test process: runs `test` again in a child process with the
/// simulation's env plus `env`, checks it passed and returns true. In that
/// child: returns false, and the test body runs.
fn in_child(test: &str, env: &[(&str, &str)]) -> bool {
    if std::env::var(CHILD).as_deref() == Ok(test) {
        return false;
    }
    let a = common::artifacts();
    let scratch = common::Scratch::new(&format!("nvml-client-{test}"));
    let config = scratch.dir.join("devices");
    std::fs::write(&config, device_file()).unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        .env(LIB_DIR, &a.sim_dir)
        .env("HAMI_TEST_ARTIFACTS", a.sim.parent().unwrap())
        // Where programs find `libcuda.so.1` and `libnvidia-ml.so.1` by name.
        .env("LD_LIBRARY_PATH", &a.sim_dir)
        .env("SIM_GPU_CONFIG", &config)
        .env_remove("SIM_GPU_DEVICES")
        .env("SIM_GPU_STATE_DIR", scratch.dir.join("sim-gpu"))
        .env_remove("SIM_GPU_PID_OFFSET")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("CUDA_DEVICE_MEMORY_LIMIT")
        .env_remove("CUDA_DEVICE_SM_LIMIT")
        .env_remove("LD_PRELOAD")
        .env("CUDA_DEVICE_MEMORY_SHARED_CACHE", scratch.region())
        .env("HAMI_LIMITS_FILE", scratch.limits());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{test} failed in its child:\n{text}");
    assert!(text.contains("1 passed"), "{test} did not run:\n{text}");
    true
}

fn lib_dir() -> PathBuf {
    PathBuf::from(std::env::var_os(LIB_DIR).expect("set by in_child"))
}

/// NVML through nvml-wrapper, loaded from the simulated library by its soname.
fn nvml() -> Nvml {
    let lib = lib_dir().join("libnvidia-ml.so.1");
    Nvml::builder()
        .lib_path(lib.as_os_str())
        .init()
        .expect("nvmlInit_v2")
}

#[test]
fn nvml_wrapper_sees_the_device_file() {
    if in_child("nvml_wrapper_sees_the_device_file", &[]) {
        return;
    }
    let nvml = nvml();
    assert_eq!(nvml.sys_driver_version().unwrap(), "550.54.15");
    assert_eq!(nvml.sys_nvml_version().unwrap(), "12.550.54.15");
    assert_eq!(nvml.sys_cuda_driver_version().unwrap(), 12040);
    assert_eq!(nvml.device_count().unwrap(), CARDS.len() as u32);
    let me = std::process::id();
    assert!(!nvml.sys_process_name(me, 64).unwrap().is_empty());

    let devices: Vec<Device> = (0..CARDS.len() as u32)
        .map(|i| nvml.device_by_index(i).unwrap())
        .collect();
    assert!(matches!(
        nvml.device_by_index(CARDS.len() as u32),
        Err(NvmlError::InvalidArg)
    ));
    let ccs = [(9, 0), (8, 0), (8, 9), (7, 5)];
    let arches = [
        DeviceArchitecture::Hopper,
        DeviceArchitecture::Ampere,
        DeviceArchitecture::Ada,
        DeviceArchitecture::Turing,
    ];
    for (i, (d, &(memory, _sms, uuid, name))) in devices.iter().zip(&CARDS).enumerate() {
        let bus_id = format!("00000000:{:02X}:00.0", i + 1);
        assert_eq!(d.name().unwrap(), name);
        assert_eq!(d.uuid().unwrap(), uuid);
        assert_eq!(d.index().unwrap(), i as u32);
        assert_eq!(d.minor_number().unwrap(), i as u32);
        assert_eq!(
            d.serial().unwrap(),
            format!("{}", 1_320_000_000_000u64 + i as u64)
        );
        assert_eq!(d.brand().unwrap(), Brand::Nvidia);
        let cc = d.cuda_compute_capability().unwrap();
        assert_eq!((cc.major, cc.minor), ccs[i % 4], "{name}");
        assert_eq!(d.architecture().unwrap(), arches[i % 4], "{name}");

        // Handles by UUID, PCI bus id (both spellings), serial: the same card.
        let same = |o: Device| o.index().unwrap() == i as u32;
        assert!(same(nvml.device_by_uuid(uuid).unwrap()));
        assert!(same(nvml.device_by_pci_bus_id(bus_id.as_str()).unwrap()));
        assert!(same(
            nvml.device_by_pci_bus_id(format!("0000:{:02x}:00.0", i + 1))
                .unwrap()
        ));
        #[allow(deprecated)]
        let by_serial = nvml.device_by_serial(d.serial().unwrap()).unwrap();
        assert!(same(by_serial));

        let pci = d.pci_info().unwrap();
        assert_eq!(pci.bus_id, bus_id);
        assert_eq!((pci.domain, pci.bus, pci.device), (0, i as u32 + 1, 0));
        assert_eq!(pci.pci_device_id & 0xffff, 0x10DE, "NVIDIA's vendor id");
        assert_eq!(pci.pci_sub_system_id, Some(0x16C1_10DE));

        let m = d.memory_info().unwrap();
        assert_eq!(
            (m.total, m.used, m.free, m.reserved),
            (memory, 0, memory, 0)
        );

        // Dual-socket: cards 0-3 on NUMA node 0 with the first half of the
        // CPUs, 4-7 on node 1.
        let node = (i / 4) as u32;
        assert_eq!(d.numa_node_id().unwrap(), node);
        let cpus = d.cpu_affinity(64).unwrap();
        // SAFETY: no preconditions.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        let set: Vec<usize> = (0..64 * 64)
            .filter(|b| cpus[b / 64] & (1 << (b % 64)) != 0)
            .collect();
        let half = online / 2;
        let want: Vec<usize> = match (half, node) {
            (0, _) => (0..online).collect(),
            (_, 0) => (0..half).collect(),
            _ => (half..online).collect(),
        };
        assert_eq!(set, want, "CPUs of NUMA node {node}");
        let mem_nodes = d.memory_affinity(1, 0).unwrap();
        assert_eq!(mem_nodes[0], 1 << node);

        let mig = d.mig_mode().unwrap();
        assert_eq!((mig.current, mig.pending), (0, 0), "MIG disabled");
        assert!(matches!(
            d.link_wrapper_for(0).is_active(),
            Err(NvmlError::NotSupported)
        ));

        // Sensors of an idle card.
        assert_eq!(d.temperature(TemperatureSensor::Gpu).unwrap(), 30);
        assert_eq!(
            d.temperature_threshold(TemperatureThreshold::Slowdown)
                .unwrap(),
            89
        );
        assert_eq!(d.power_usage().unwrap(), 60_000);
        assert_eq!(d.power_management_limit().unwrap(), 300_000);
        assert_eq!(d.power_management_limit_default().unwrap(), 300_000);
        assert_eq!(d.enforced_power_limit().unwrap(), 300_000);
        let c = d.power_management_limit_constraints().unwrap();
        assert_eq!((c.min_limit, c.max_limit), (100_000, 300_000));
        assert_eq!(d.performance_state().unwrap(), PerformanceState::Eight);
        let u = d.utilization_rates().unwrap();
        assert_eq!((u.gpu, u.memory), (0, 0));
        assert_eq!(d.clock_info(Clock::Graphics).unwrap(), 345);
        assert_eq!(d.clock_info(Clock::Memory).unwrap(), 2619);
        assert_eq!(d.max_clock_info(Clock::SM).unwrap(), 1980);
        assert_eq!(d.clock(Clock::SM, ClockId::Current).unwrap(), 345);
        assert_eq!(d.clock(Clock::SM, ClockId::CustomerMaxBoost).unwrap(), 1980);
        assert_eq!(d.num_fans().unwrap(), 0);
        assert!(matches!(d.fan_speed(0), Err(NvmlError::NotSupported)));
        assert!(d.is_in_persistent_mode().unwrap());
        let ecc = d.is_ecc_enabled().unwrap();
        assert!(ecc.currently_enabled && ecc.pending_enabled);
        assert!(d.running_compute_processes().unwrap().is_empty());
        assert!(d.running_compute_processes_v2().unwrap().is_empty());
        assert!(d.running_graphics_processes().unwrap().is_empty());
        assert!(d.mps_running_compute_processes().unwrap().is_empty());
    }
    assert!(matches!(
        nvml.device_by_uuid("GPU-nope"),
        Err(NvmlError::NotFound)
    ));
    assert!(matches!(
        nvml.device_by_pci_bus_id("00000000:7F:00.0"),
        Err(NvmlError::NotFound)
    ));

    // Topology: pairs on a PCIe switch, four cards a NUMA node.
    let level = |a: usize, b: usize| {
        devices[a]
            .topology_common_ancestor(nvml.device_by_index(b as u32).unwrap())
            .unwrap()
    };
    assert_eq!(level(0, 0), TopologyLevel::Internal);
    assert_eq!(level(0, 1), TopologyLevel::Single);
    assert_eq!(level(0, 2), TopologyLevel::Node);
    assert_eq!(level(0, 4), TopologyLevel::System);
    let near: Vec<u32> = devices[2]
        .topology_nearest_gpus(TopologyLevel::Node)
        .unwrap()
        .iter()
        .map(|d| d.index().unwrap())
        .collect();
    assert_eq!(near, [0, 1, 3]);
    let on_cpu0: Vec<u32> = nvml
        .topology_gpu_set(0)
        .unwrap()
        .iter()
        .map(|d| d.index().unwrap())
        .collect();
    assert!(on_cpu0.starts_with(&[0, 1, 2, 3]), "{on_cpu0:?}");

    // Events: the device plugin's health check registers for Xid and ECC
    // events and waits; nothing happens on a simulated card.
    use nvml_wrapper::bitmasks::event::EventTypes;
    let supported = devices[0].supported_event_types().unwrap();
    let wanted = EventTypes::CRITICAL_XID_ERROR
        | EventTypes::DOUBLE_BIT_ECC_ERROR
        | EventTypes::SINGLE_BIT_ECC_ERROR;
    assert!(supported.contains(wanted), "{supported:?}");
    let mut set = nvml.create_event_set().unwrap();
    for d in &devices {
        set = d.register_events(wanted, set).unwrap();
    }
    let t = Instant::now();
    assert!(matches!(set.wait(100), Err(NvmlError::Timeout)));
    assert!(t.elapsed() >= Duration::from_millis(100));
    set.release_events().unwrap();
    let set = nvml.create_event_set().unwrap();
    assert!(
        devices[0]
            .register_events(EventTypes::POWER_SOURCE_CHANGE, set)
            .is_err(),
        "not a supported event type"
    );

    // The raw library: versions nvml-wrapper's safe API does not call.
    let lib = nvml.lib();
    // SAFETY: NVML calls with valid handles and out pointers.
    unsafe {
        let h = devices[1].handle();
        let msg = CStr::from_ptr(lib.nvmlErrorString(3)).to_str().unwrap();
        assert_eq!(msg, "Not Supported");
        let mut n = 0;
        assert_eq!(lib.nvmlDeviceGetCount(&mut n), 0);
        assert_eq!(n, CARDS.len() as u32);
        let mut h1 = std::ptr::null_mut();
        assert_eq!(lib.nvmlDeviceGetHandleByIndex(1, &mut h1), 0);
        assert_eq!(h1, h);
        let mut h2 = std::ptr::null_mut();
        assert_eq!(
            lib.nvmlDeviceGetHandleByPciBusId(c"0000:02:00.0".as_ptr(), &mut h2),
            0
        );
        assert_eq!(h2, h);
        // nvmlDeviceGetPciInfo and _v2 fill the pre-9.0 struct, whose 36
        // first bytes are today's: legacy bus id, domain, bus, ids.
        for f in [
            lib.nvmlDeviceGetPciInfo_v2.as_ref(),
            lib.nvmlDeviceGetPciInfo.as_ref(),
        ] {
            let mut p: ffi::nvmlPciInfo_t = std::mem::zeroed();
            assert_eq!(f.unwrap()(h, &mut p), 0);
            let legacy = CStr::from_ptr(p.busIdLegacy.as_ptr()).to_str().unwrap();
            assert_eq!(legacy, "0000:02:00.0");
            assert_eq!((p.domain, p.bus, p.pciSubSystemId), (0, 2, 0x16C1_10DE));
            assert_eq!(p.busId[16..], [0; 16], "past the old struct's end");
        }
        let mut x: ffi::nvmlPciInfoExt_t = std::mem::zeroed();
        x.version = std::mem::size_of::<ffi::nvmlPciInfoExt_t>() as u32 | 1 << 24;
        assert_eq!(lib.nvmlDeviceGetPciInfoExt(h, &mut x), 0);
        let bus_id = CStr::from_ptr(x.busId.as_ptr()).to_str().unwrap();
        assert_eq!(
            (bus_id, x.bus, x.baseClass, x.subClass),
            ("00000000:02:00.0", 2, 3, 2)
        );
        let mut m: ffi::nvmlMemory_t = std::mem::zeroed();
        assert_eq!(lib.nvmlDeviceGetMemoryInfo(h, &mut m), 0);
        assert_eq!((m.total, m.free, m.used), (4 * GIB, 4 * GIB, 0));
        let mut m2: ffi::nvmlMemory_v2_t = std::mem::zeroed();
        assert_eq!(
            lib.nvmlDeviceGetMemoryInfo_v2(h, &mut m2),
            25,
            "no version set"
        );
        let mut cur = 9;
        let mut pend = 9;
        assert_eq!(lib.nvmlDeviceGetEccMode(h, &mut cur, &mut pend), 0);
        assert_eq!((cur, pend), (1, 1));
        let mut set = std::ptr::null_mut();
        assert_eq!(lib.nvmlEventSetCreate(&mut set), 0);
        let mut data: ffi::nvmlEventData_t = std::mem::zeroed();
        assert_eq!(lib.nvmlEventSetWait(set, &mut data, 1), 10, "timeout");
        assert_eq!(lib.nvmlEventSetFree(set), 0);
        assert_eq!(lib.nvmlEventSetFree(set), 2, "freed already");
        assert_eq!(lib.nvmlInitWithFlags(1), 0, "NVML_INIT_FLAG_NO_GPUS");
        assert_eq!(lib.nvmlShutdown(), 0);
    }
    nvml.shutdown().unwrap();
}

/// `libcuda.so.1` of the simulation (or the interposer's hooks, when it
/// is preloaded), called directly.
struct Cuda(*mut c_void);

impl Cuda {
    fn open() -> Cuda {
        let path = std::ffi::CString::new(
            lib_dir()
                .join("libcuda.so.1")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: a valid path.
        let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
        assert!(!h.is_null());
        let cuda = Cuda(h);
        let mut ctx = 0usize;
        // SAFETY: driver signatures of those names.
        unsafe {
            assert_eq!(
                cuda.f::<unsafe extern "C" fn(c_uint) -> c_int>(c"cuInit")(0),
                0
            );
            assert_eq!(
                cuda.f::<unsafe extern "C" fn(*mut usize, c_int) -> c_int>(
                    c"cuDevicePrimaryCtxRetain"
                )(&mut ctx, 0),
                0
            );
            assert_eq!(
                cuda.f::<unsafe extern "C" fn(usize) -> c_int>(c"cuCtxSetCurrent")(ctx),
                0
            );
        }
        cuda
    }

    /// # Safety
    /// `T` must be the function type of `name`.
    unsafe fn f<T: Copy>(&self, name: &CStr) -> T {
        // SAFETY: a valid handle and name.
        let p = unsafe { libc::dlsym(self.0, name.as_ptr()) };
        assert!(!p.is_null(), "{name:?}");
        // SAFETY: T is a function pointer of that symbol's type.
        unsafe { std::mem::transmute_copy(&p) }
    }

    fn alloc(&self, bytes: usize) -> c_int {
        let mut p = 0u64;
        // SAFETY: cuMemAlloc_v2(CUdeviceptr*, size_t).
        unsafe {
            self.f::<unsafe extern "C" fn(*mut u64, usize) -> c_int>(c"cuMemAlloc_v2")(
                &mut p, bytes,
            )
        }
    }

    /// `ms` of kernels on the card (a grid of `ms * 1000` blocks is
    /// `ms` ms on the simulation), then waits for them.
    fn busy(&self, ms: u32) {
        type Launch = unsafe extern "C" fn(
            u64,
            c_uint,
            c_uint,
            c_uint,
            c_uint,
            c_uint,
            c_uint,
            c_uint,
            u64,
            *mut *mut c_void,
            *mut *mut c_void,
        ) -> c_int;
        // SAFETY: the driver's signatures.
        unsafe {
            let launch = self.f::<Launch>(c"cuLaunchKernel");
            let rc = launch(
                1,
                1000,
                ms,
                1,
                1,
                1,
                1,
                0,
                0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            assert_eq!(rc, 0);
            assert_eq!(
                self.f::<unsafe extern "C" fn() -> c_int>(c"cuCtxSynchronize")(),
                0
            );
        }
    }
}

#[test]
fn nvml_wrapper_sees_work_on_the_card() {
    if in_child("nvml_wrapper_sees_work_on_the_card", &[]) {
        return;
    }
    let nvml = nvml();
    let cuda = Cuda::open();
    assert_eq!(cuda.alloc(512 << 20), 0);
    cuda.busy(400);
    let d = nvml.device_by_index(0).unwrap();
    let m = d.memory_info().unwrap();
    assert_eq!((m.total, m.used), (8 * GIB, 512 << 20));
    // CUDA device 0 and NVML's card 0 agree on PCI address and capability.
    let mut id = [0 as std::ffi::c_char; 32];
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the driver's signatures, valid out pointers.
    unsafe {
        type BusId = unsafe extern "C" fn(*mut std::ffi::c_char, c_int, c_int) -> c_int;
        type Attr = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
        assert_eq!(
            cuda.f::<BusId>(c"cuDeviceGetPCIBusId")(id.as_mut_ptr(), 32, 0),
            0
        );
        let attr = cuda.f::<Attr>(c"cuDeviceGetAttribute");
        assert_eq!(attr(&mut major, 75, 0), 0);
        assert_eq!(attr(&mut minor, 76, 0), 0);
    }
    // SAFETY: NUL-terminated by the driver.
    let id = unsafe { CStr::from_ptr(id.as_ptr()) }.to_str().unwrap();
    assert_eq!(id, "0000:01:00.0");
    assert_eq!(nvml.device_by_pci_bus_id(id).unwrap().index().unwrap(), 0);
    let cc = d.cuda_compute_capability().unwrap();
    assert_eq!((major, minor), (cc.major, cc.minor));
    let procs = d.running_compute_processes().unwrap();
    assert_eq!(procs.len(), 1);
    assert_eq!(procs[0].pid, std::process::id());
    assert_eq!(procs[0].used_gpu_memory, UsedGpuMemory::Used(512 << 20));
    assert_eq!(procs[0].gpu_instance_id, None);
    let v2 = d.running_compute_processes_v2().unwrap();
    assert_eq!(v2[0].pid, std::process::id());
    // nvmlProcessInfo_v1_t: pid and memory only.
    // SAFETY: a valid handle and room for 4 entries.
    unsafe {
        let mut n: c_uint = 4;
        let mut v1: [ffi::nvmlProcessInfo_v1_t; 4] = std::mem::zeroed();
        let rc = nvml.lib().nvmlDeviceGetComputeRunningProcesses(
            d.handle(),
            &mut n,
            v1.as_mut_ptr().cast(),
        );
        assert_eq!((rc, n), (0, 1));
        assert_eq!(
            (v1[0].pid, v1[0].usedGpuMemory),
            (std::process::id(), 512 << 20)
        );
        let mut n: c_uint = 0;
        let rc = nvml.lib().nvmlDeviceGetComputeRunningProcesses_v3(
            d.handle(),
            &mut n,
            std::ptr::null_mut(),
        );
        assert_eq!(
            (rc, n),
            (7, 1),
            "NVML_ERROR_INSUFFICIENT_SIZE with the count"
        );
    }

    // 400 ms busy in the last second: utilisation, temperature, power and
    // clocks follow.
    // (Utilisation only falls from here, once the last second no longer
    // holds all 400 ms: readings are bracketed by two utilisations.)
    let util = d.utilization_rates().unwrap().gpu;
    assert!((1..=60).contains(&util), "{util}%");
    let temperature = d.temperature(TemperatureSensor::Gpu).unwrap();
    let power = d.power_usage().unwrap();
    let later = d.utilization_rates().unwrap().gpu;
    assert!((30 + later * 2 / 5..=30 + util * 2 / 5).contains(&temperature));
    assert!((60_000 + 2_400 * later..=60_000 + 2_400 * util).contains(&power));
    assert_eq!(d.clock_info(Clock::SM).unwrap(), 1980);
    assert_eq!(d.performance_state().unwrap(), PerformanceState::Zero);
    let idle = nvml.device_by_index(1).unwrap();
    assert_eq!(
        idle.utilization_rates().unwrap().gpu,
        0,
        "only card 0 worked"
    );
}

#[test]
fn utilization_samples_cover_exactly_the_time_since_the_last_read() {
    if in_child(
        "utilization_samples_cover_exactly_the_time_since_the_last_read",
        &[],
    ) {
        return;
    }
    use nvml_wrapper::enum_wrappers::device::Sampling;
    use nvml_wrapper::enums::device::SampleValue;
    let nvml = nvml();
    let cuda = Cuda::open();
    let d = nvml.device_by_index(0).unwrap();
    let percent = |s: &nvml_wrapper::struct_wrappers::device::Sample| match s.value {
        SampleValue::U32(v) => v,
        ref v => panic!("a GPU utilization sample is an unsigned int, got {v:?}"),
    };
    // Idle: a second of 50 ms samples, all 0.
    let idle = d.samples(Sampling::GpuUtilization, None).unwrap();
    assert!((19..=20).contains(&idle.len()), "{}", idle.len());
    assert!(idle.iter().all(|s| percent(s) == 0));
    assert!(
        idle.windows(2)
            .all(|w| w[1].timestamp - w[0].timestamp == 50_000)
    );
    let seen = idle.last().unwrap().timestamp;
    // 300 ms of kernels: the samples after the last one read are new ones,
    // and those inside the run read the card busy throughout.
    cuda.busy(300);
    let busy = d.samples(Sampling::GpuUtilization, seen).unwrap();
    assert!(busy.iter().all(|s| s.timestamp > seen));
    let full = busy.iter().filter(|s| percent(s) == 100).count();
    assert!((4..=6).contains(&full), "{busy:?}");
    // Other sample kinds are not simulated.
    assert!(matches!(
        d.samples(Sampling::Power, None),
        Err(NvmlError::NotSupported)
    ));
}

#[test]
fn nvml_wrapper_through_the_interposer_sees_the_containers_view() {
    // The child never builds (nor asks for) the artifacts: it runs with
    // the interposer preloaded.
    let preload = match std::env::var_os(CHILD) {
        Some(_) => String::new(),
        None => common::artifacts().vgpu.display().to_string(),
    };
    if in_child(
        "nvml_wrapper_through_the_interposer_sees_the_containers_view",
        &[("LD_PRELOAD", &preload), ("CUDA_DEVICE_MEMORY_LIMIT", "1g")],
    ) {
        return;
    }
    // As hami-node does: by soname, found on LD_LIBRARY_PATH.
    let nvml = Nvml::init().unwrap();
    let cuda = Cuda::open();
    assert_eq!(cuda.alloc(256 << 20), 0);
    assert_eq!(
        cuda.alloc(800 << 20),
        2,
        "over the 1 GiB limit: out of memory"
    );
    let d = nvml.device_by_index(0).unwrap();
    let m = d.memory_info().unwrap();
    assert_eq!(
        (m.total, m.used, m.free),
        (GIB, 256 << 20, GIB - (256 << 20))
    );
    let procs = d.running_compute_processes().unwrap();
    assert_eq!(procs.len(), 1);
    assert_eq!(procs[0].pid, std::process::id());
    // The rest of NVML passes through untouched.
    assert_eq!(d.name().unwrap(), CARDS[0].3);
    assert_eq!(d.numa_node_id().unwrap(), 0);
}
