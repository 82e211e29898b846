//! The pure part of Allocate: from the pod the scheduler bound (its
//! `hami.io/vgpu-devices-to-allocate`) and the Allocate request, the
//! container responses (environment and mounts, exactly as HAMi's device
//! plugin gives them in hami-core mode, spec section 7), the files to
//! prepare on the host, and the annotation value left to allocate.
//!
//! No I/O here: the caller passes the random part of the shared-cache
//! name, and does the writes ([`crate::pending`]).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use hami_api::allocation::{ContainerDevices, PodDevices};
use hami_api::annotations as ann;
use hami_api::{DeviceInfo, NvidiaConfig};
use hami_shm::env as shm_env;
use hami_shm::env::Limits;
use k8s_openapi::api::core::v1::{Container, Pod};

use crate::proto::{AllocateRequest, ContainerAllocateResponse, Mount};

/// Env: the container's cards, comma-joined UUIDs.
pub const NVIDIA_VISIBLE_DEVICES: &str = shm_env::NVIDIA_VISIBLE_DEVICES;
/// Env prefix of the per-device memory limit, `CUDA_DEVICE_MEMORY_LIMIT_<i>`.
pub const MEMORY_LIMIT_PREFIX: &str = "CUDA_DEVICE_MEMORY_LIMIT_";
/// Env: the SM (compute) limit in percent.
pub const SM_LIMIT: &str = shm_env::SM_LIMIT;
/// Env: the shared region file, inside the per-container dir.
pub const SHARED_CACHE: &str = shm_env::SHARED_CACHE;
/// Env: `true` when the node's memory is oversubscribed.
pub const OVERSUBSCRIBE: &str = shm_env::OVERSUBSCRIBE;
/// Env: the interposer's log level.
pub const LOG_LEVEL: &str = shm_env::LOG_LEVEL;
/// Env: `disable` when core limits are disabled.
pub const CORE_POLICY: &str = shm_env::CORE_POLICY;
/// Env (hami-rs only): where the interposer finds the limits file.
pub const LIMITS_FILE: &str = shm_env::LIMITS_FILE;
/// Container env with which a container opts out of the interposer.
pub const DISABLE_CONTROL: &str = shm_env::DISABLE_CONTROL;
/// File name of the limits file in the container's limits dir.
pub const LIMITS_FILE_NAME: &str = hami_shm::limits::FILE_NAME;
/// Name of the read-only limits dir under `<hook>/vgpu`: on the host the
/// parent of every container's limits dir, in the container the mount
/// point of its own.
pub const LIMITS_DIR_NAME: &str = "limits";
/// HAMi's lock dir, mounted into every GPU container.
pub const VGPU_LOCK_DIR: &str = "/tmp/vgpulock";

/// Where a container's dynamic loader finds the driver's libraries (the
/// multiarch dir of glibc-based images, where the NVIDIA container toolkit
/// puts them too).
pub const CONTAINER_LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";
/// File name, in a container's limits dir, of the UUIDs of its cards, one
/// per line in its device order: written by Allocate on the host, so the
/// node monitor knows a container's cards from a file the container cannot
/// write.
pub const CARDS_FILE_NAME: &str = "cards";
/// File name, in a container's limits dir, of its simulated cards.
pub const SIM_DEVICES_FILE_NAME: &str = "sim-gpu-devices";
/// Where sim-gpu looks in a container (sim-gpu's `config::CONTAINER_ROOT`).
pub const SIM_CONTAINER_ROOT: &str = "/run/sim-gpu";

/// With `--sim`: hami-node plays the NVIDIA container toolkit for
/// sim-gpu's driver, so any glibc image runs CUDA programs against the
/// simulated cards. Each GPU container gets the library as `libcuda.so.1`
/// and `libnvidia-ml.so.1`, a device file of only its own cards (as the
/// toolkit exposes only the allocated GPUs, whatever the process's
/// environment) and the host's shared card state. Test and demo support.
#[derive(Debug, Clone, PartialEq)]
pub struct SimDriver {
    /// Host path of `libsim_gpu.so`.
    pub library: PathBuf,
    /// The node's device file text (`<memory> <sms> <uuid> <name>` lines).
    pub devices: String,
    /// Host dir of the cards' shared state (`SIM_GPU_STATE_DIR`).
    pub state_dir: PathBuf,
}

impl SimDriver {
    /// The device file of a container: the node's lines for `uuids`, in
    /// that order (the container's CUDA ordinals).
    pub fn devices_for(&self, uuids: &[&str]) -> String {
        let mut out = String::new();
        for u in uuids {
            if let Some(line) = self
                .devices
                .lines()
                .find(|l| l.split_whitespace().nth(2) == Some(u))
            {
                out.push_str(line.trim());
                out.push('\n');
            }
        }
        out
    }
}

/// What Allocate needs to know about the node.
#[derive(Debug, Clone)]
pub struct Settings {
    /// HAMi's `HOOK_PATH` (`global.gpuHookPath`): the interposer's files
    /// live under `<hook>/vgpu`, on the host and in the container alike.
    pub hook_path: PathBuf,
    /// Host path of `libvgpu.so` (see [`Settings::library_path`]).
    pub library: PathBuf,
    /// `CUDA_OVERSUBSCRIBE=true` (deviceMemoryScaling > 1).
    pub oversubscribe: bool,
    /// `LIBCUDA_LOG_LEVEL`, when set.
    pub log_level: Option<u32>,
    /// `GPU_CORE_UTILIZATION_POLICY=disable` (`disablecorelimit`).
    pub disable_core_limit: bool,
    /// Whether a container's `CUDA_DISABLE_CONTROL=true` drops the
    /// `/etc/ld.so.preload` mount (HAMi: always).
    pub allow_disable_control: bool,
    /// sim-gpu's driver, injected into GPU containers (`--sim`).
    pub sim: Option<SimDriver>,
}

impl Settings {
    /// Settings from the NVIDIA device config, with the library at its
    /// default host path.
    pub fn from_config(hook_path: &Path, cfg: &NvidiaConfig) -> Settings {
        Settings {
            hook_path: hook_path.to_path_buf(),
            library: hook_path.join("vgpu/libvgpu.so"),
            oversubscribe: cfg.device_memory_scaling > 1.0,
            log_level: Some(cfg.lib_cuda_log_level),
            disable_core_limit: cfg.disable_core_limit,
            allow_disable_control: true,
            sim: None,
        }
    }

    /// `<hook>/vgpu`: where the per-container dir is mounted.
    pub fn vgpu_dir(&self) -> PathBuf {
        self.hook_path.join("vgpu")
    }

    /// HAMi's choice of library: `<hook>/vgpu/libvgpu.so.<version>` when
    /// `versioned_exists`, else `<hook>/vgpu/libvgpu.so`.
    pub fn library_path(hook_path: &Path, version: &str, versioned_exists: bool) -> PathBuf {
        if versioned_exists {
            hook_path.join(format!("vgpu/libvgpu.so.{version}"))
        } else {
            hook_path.join("vgpu/libvgpu.so")
        }
    }

    /// Host dir of one container: `<hook>/vgpu/containers/<podUID>_<container>`.
    pub fn container_dir(&self, pod_uid: &str, container: &str) -> PathBuf {
        self.vgpu_dir()
            .join("containers")
            .join(format!("{pod_uid}_{container}"))
    }

    /// Host dir of one container's limits file, mounted read-only:
    /// `<hook>/vgpu/limits/<podUID>_<container>`.
    pub fn limits_dir(&self, pod_uid: &str, container: &str) -> PathBuf {
        self.vgpu_dir()
            .join(LIMITS_DIR_NAME)
            .join(format!("{pod_uid}_{container}"))
    }
}

/// Why Allocate cannot serve a pod. Every message names the pod and the
/// value at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocError {
    /// The pod has no to-allocate annotation.
    NoAnnotation { pod: String },
    /// The annotation does not decode.
    BadAnnotation { pod: String, error: String },
    /// Every entry is already empty.
    NothingLeft { pod: String, value: String },
    /// An entry points past the pod's containers.
    NoSuchContainer {
        pod: String,
        entry: usize,
        containers: usize,
    },
    /// The request and the annotation disagree on the number of devices.
    CountMismatch {
        pod: String,
        container: String,
        annotated: usize,
        requested: usize,
    },
    /// The scheduler gave a card this node does not have.
    UnknownCard {
        pod: String,
        container: String,
        uuid: String,
    },
    /// The pod has no UID (never the case for a pod read from the API).
    NoUid { pod: String },
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = ann::NVIDIA_DEVICES_TO_ALLOCATE;
        match self {
            AllocError::NoAnnotation { pod } => write!(f, "pod {pod} has no {key} annotation"),
            AllocError::BadAnnotation { pod, error } => write!(f, "pod {pod}: {error}"),
            AllocError::NothingLeft { pod, value } => write!(
                f,
                "pod {pod}: {key}={value:?} has no container left to allocate"
            ),
            AllocError::NoSuchContainer {
                pod,
                entry,
                containers,
            } => write!(
                f,
                "pod {pod}: {key} entry {entry} has devices but the pod has only {containers} containers (init containers first)"
            ),
            AllocError::CountMismatch {
                pod,
                container,
                annotated,
                requested,
            } => write!(
                f,
                "pod {pod} container {container}: {key} gives {annotated} devices but the Allocate request asks for {requested}"
            ),
            AllocError::UnknownCard {
                pod,
                container,
                uuid,
            } => write!(
                f,
                "pod {pod} container {container}: {key} names card {uuid}, which this node does not have"
            ),
            AllocError::NoUid { pod } => write!(f, "pod {pod} has no uid"),
        }
    }
}

impl std::error::Error for AllocError {}

/// One container served by an Allocate call.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub container: String,
    /// Index of its entry in the annotation.
    pub entry: usize,
    pub devices: ContainerDevices,
    /// The per-container host dir to (re)create (read-write in the container).
    pub host_dir: PathBuf,
    /// The host dir of the limits file, to (re)create (read-only in the
    /// container).
    pub limits_dir: PathBuf,
    /// The limits file to write into `limits_dir`.
    pub limits: Limits,
    /// With `--sim`: the container's device file, to write into
    /// `limits_dir` as [`SIM_DEVICES_FILE_NAME`].
    pub sim_devices: Option<String>,
    pub response: ContainerAllocateResponse,
}

/// The outcome of Allocate for one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// One per container request, in request order.
    pub served: Vec<Served>,
    /// The annotation value after the served containers are emptied.
    pub remaining: PodDevices,
}

impl Plan {
    /// No entry holds a device any more: the bind is complete.
    pub fn all_done(&self) -> bool {
        self.remaining.is_empty()
    }

    /// The responses, in request order.
    pub fn responses(&self) -> Vec<ContainerAllocateResponse> {
        self.served.iter().map(|s| s.response.clone()).collect()
    }
}

/// `namespace/name` of a pod.
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// The pod's to-allocate annotation, decoded.
pub fn to_allocate(pod: &Pod) -> Result<PodDevices, AllocError> {
    let value = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ann::NVIDIA_DEVICES_TO_ALLOCATE))
        .ok_or_else(|| AllocError::NoAnnotation { pod: pod_key(pod) })?;
    PodDevices::decode(ann::NVIDIA_DEVICES_TO_ALLOCATE, value).map_err(|e| {
        AllocError::BadAnnotation {
            pod: pod_key(pod),
            error: e.to_string(),
        }
    })
}

/// The container of annotation entry `i`: init containers first, then the
/// regular ones.
fn container_at(pod: &Pod, i: usize) -> Option<&Container> {
    let spec = pod.spec.as_ref()?;
    let init = spec.init_containers.as_deref().unwrap_or_default();
    if i < init.len() {
        init.get(i)
    } else {
        spec.containers.get(i - init.len())
    }
}

/// The annotation entry of the container named `name`: init containers
/// first, then the regular ones.
pub fn container_index(pod: &Pod, name: &str) -> Option<usize> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .as_deref()
        .unwrap_or_default()
        .iter()
        .chain(spec.containers.iter())
        .position(|c| c.name == name)
}

fn container_count(pod: &Pod) -> usize {
    pod.spec.as_ref().map_or(0, |s| {
        s.init_containers.as_ref().map_or(0, Vec::len) + s.containers.len()
    })
}

/// Go's `strconv.ParseBool` true values, as HAMi reads `CUDA_DISABLE_CONTROL`.
fn go_true(v: &str) -> bool {
    matches!(v, "1" | "t" | "T" | "TRUE" | "true" | "True")
}

fn disables_control(c: &Container) -> bool {
    c.env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|e| e.name == DISABLE_CONTROL && e.value.as_deref().is_some_and(go_true))
}

/// The container's cards, each once, in the order of its devices.
pub fn card_uuids(devices: &ContainerDevices) -> Vec<&str> {
    let mut uuids: Vec<&str> = Vec::new();
    for d in devices {
        if !uuids.contains(&d.uuid.as_str()) {
            uuids.push(&d.uuid);
        }
    }
    uuids
}

/// The response for one container: what HAMi's device plugin returns in
/// hami-core mode, plus `HAMI_LIMITS_FILE`.
pub fn container_response(
    settings: &Settings,
    pod_uid: &str,
    container: &Container,
    devices: &ContainerDevices,
    cache_id: &str,
) -> ContainerAllocateResponse {
    let mut envs = common_env(settings, cache_id);
    envs.insert(
        NVIDIA_VISIBLE_DEVICES.to_string(),
        card_uuids(devices).join(","),
    );
    for (i, d) in devices.iter().enumerate() {
        envs.insert(format!("{MEMORY_LIMIT_PREFIX}{i}"), format!("{}m", d.mem));
    }
    if let Some(first) = devices.first() {
        envs.insert(SM_LIMIT.to_string(), first.cores.to_string());
    }
    let limits_on_host = settings.limits_dir(pod_uid, &container.name);
    let mounts = common_mounts(
        settings,
        &settings.container_dir(pod_uid, &container.name),
        &limits_on_host,
        MountStyle::Files,
        !(settings.allow_disable_control && disables_control(container)),
    );
    ContainerAllocateResponse {
        envs,
        mounts,
        ..Default::default()
    }
}

/// The environment every GPU container gets, whatever its cards: the
/// shared region `<vgpu>/<cache_id>.cache`, the limits file's path and the
/// node's settings.
pub(crate) fn common_env(settings: &Settings, cache_id: &str) -> HashMap<String, String> {
    let vgpu = settings.vgpu_dir();
    let mut envs = HashMap::new();
    envs.insert(
        SHARED_CACHE.to_string(),
        vgpu.join(format!("{cache_id}.cache")).display().to_string(),
    );
    if settings.oversubscribe {
        envs.insert(OVERSUBSCRIBE.to_string(), "true".to_string());
    }
    if let Some(level) = settings.log_level {
        envs.insert(LOG_LEVEL.to_string(), level.to_string());
    }
    if settings.disable_core_limit {
        envs.insert(CORE_POLICY.to_string(), "disable".to_string());
    }
    // The limits file lives in a dir the container mounts read-only.
    envs.insert(
        LIMITS_FILE.to_string(),
        vgpu.join(LIMITS_DIR_NAME)
            .join(LIMITS_FILE_NAME)
            .display()
            .to_string(),
    );
    envs
}

/// How files of the limits dir reach the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MountStyle {
    /// The limits dir exists when Allocate answers: its files are also
    /// mounted one by one where HAMi's layout and sim-gpu expect them.
    Files,
    /// The limits dir is filled only later (PreStartContainer): dirs only,
    /// since a file mount whose source is missing fails the container.
    DirsOnly,
}

/// The mounts of a GPU container whose per-container dir and limits dir
/// are `container_dir` and `limits_dir` on the host; `/etc/ld.so.preload`
/// when `preload`.
pub(crate) fn common_mounts(
    settings: &Settings,
    container_dir: &Path,
    limits_dir: &Path,
    style: MountStyle,
    preload: bool,
) -> Vec<Mount> {
    let vgpu = settings.vgpu_dir();
    let limits_in_container = vgpu.join(LIMITS_DIR_NAME);
    let path = |p: &Path| p.display().to_string();
    let mut mounts = vec![
        Mount {
            container_path: path(&vgpu.join("libvgpu.so")),
            host_path: path(&settings.library),
            read_only: true,
        },
        Mount {
            container_path: path(&vgpu),
            host_path: path(container_dir),
            read_only: false,
        },
        // Nested in the read-write dir above (runtimes mount the shorter
        // path first): the limits dir, read-only, where HAMI_LIMITS_FILE
        // points.
        Mount {
            container_path: path(&limits_in_container),
            host_path: path(limits_dir),
            read_only: true,
        },
    ];
    if style == MountStyle::Files {
        // The file itself, read-only, at `<hook>/vgpu/hami-limits`, where
        // the interposer looks without HAMI_LIMITS_FILE (a process started
        // without the container's environment; it also looks in
        // `<hook>/vgpu/limits/`).
        mounts.push(Mount {
            container_path: path(&vgpu.join(LIMITS_FILE_NAME)),
            host_path: path(&limits_dir.join(LIMITS_FILE_NAME)),
            read_only: true,
        });
    }
    mounts.push(Mount {
        container_path: VGPU_LOCK_DIR.to_string(),
        host_path: VGPU_LOCK_DIR.to_string(),
        read_only: false,
    });
    if preload {
        mounts.push(Mount {
            container_path: "/etc/ld.so.preload".to_string(),
            host_path: path(&vgpu.join("ld.so.preload")),
            read_only: true,
        });
    }
    if let Some(sim) = &settings.sim {
        let lib_dir = Path::new(CONTAINER_LIB_DIR);
        for name in ["libcuda.so.1", "libnvidia-ml.so.1"] {
            mounts.push(Mount {
                container_path: path(&lib_dir.join(name)),
                host_path: path(&sim.library),
                read_only: true,
            });
        }
        let root = Path::new(SIM_CONTAINER_ROOT);
        mounts.push(match style {
            MountStyle::Files => Mount {
                container_path: path(&root.join("devices")),
                host_path: path(&limits_dir.join(SIM_DEVICES_FILE_NAME)),
                read_only: true,
            },
            // sim-gpu reads `<root>/limits/sim-gpu-devices` when
            // `<root>/devices` is missing.
            MountStyle::DirsOnly => Mount {
                container_path: path(&root.join(LIMITS_DIR_NAME)),
                host_path: path(limits_dir),
                read_only: true,
            },
        });
        mounts.push(Mount {
            container_path: path(&root.join("state")),
            host_path: path(&sim.state_dir),
            read_only: false,
        });
    }
    mounts
}

/// The limits file of a container: per device index its memory (MiB) and
/// cores, as in the environment.
pub fn container_limits(devices: &ContainerDevices) -> Limits {
    let mut l = Limits::default();
    for (i, d) in devices.iter().enumerate().take(hami_shm::MAX_DEVICES) {
        l.memory[i] = Some(d.mem << 20);
        l.sm[i] = Some(d.cores);
    }
    l
}

/// Allocate for `pod`: each container request takes the first container
/// whose entry still holds devices (HAMi's order), which must have as many
/// devices as the request asks for, all on `cards`. `cache_id` gives the
/// random part of each container's shared-cache name (a UUID in HAMi).
pub fn plan(
    pod: &Pod,
    request: &AllocateRequest,
    cards: &[DeviceInfo],
    settings: &Settings,
    cache_id: &mut dyn FnMut() -> String,
) -> Result<Plan, AllocError> {
    let key = pod_key(pod);
    let uid = pod
        .metadata
        .uid
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| AllocError::NoUid { pod: key.clone() })?;
    let mut remaining = to_allocate(pod)?;
    let original = remaining.clone();
    let mut served = Vec::new();
    for creq in &request.container_requests {
        let Some(entry) = remaining.0.iter().position(|c| !c.is_empty()) else {
            return Err(AllocError::NothingLeft {
                pod: key,
                value: original.encode(),
            });
        };
        let container = container_at(pod, entry).ok_or(AllocError::NoSuchContainer {
            pod: key.clone(),
            entry,
            containers: container_count(pod),
        })?;
        let devices = std::mem::take(&mut remaining.0[entry]);
        if devices.len() != creq.devices_ids.len() {
            return Err(AllocError::CountMismatch {
                pod: key,
                container: container.name.clone(),
                annotated: devices.len(),
                requested: creq.devices_ids.len(),
            });
        }
        if let Some(d) = devices
            .iter()
            .find(|d| !cards.iter().any(|c| c.id == d.uuid))
        {
            return Err(AllocError::UnknownCard {
                pod: key,
                container: container.name.clone(),
                uuid: d.uuid.clone(),
            });
        }
        let response = container_response(settings, uid, container, &devices, &cache_id());
        let sim_devices = settings
            .sim
            .as_ref()
            .map(|sim| sim.devices_for(&card_uuids(&devices)));
        served.push(Served {
            sim_devices,
            container: container.name.clone(),
            entry,
            host_dir: settings.container_dir(uid, &container.name),
            limits_dir: settings.limits_dir(uid, &container.name),
            limits: container_limits(&devices),
            devices,
            response,
        });
    }
    Ok(Plan { served, remaining })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ContainerAllocateRequest;
    use serde_json::json;

    fn settings() -> Settings {
        Settings::from_config(Path::new("/usr/local"), &NvidiaConfig::default())
    }

    fn cards() -> Vec<DeviceInfo> {
        ["GPU-a", "GPU-b", "GPU-c"]
            .iter()
            .map(|id| DeviceInfo {
                id: id.to_string(),
                count: 10,
                health: true,
                ..Default::default()
            })
            .collect()
    }

    fn pod(to_allocate: &str, init: &[&str], containers: &[(&str, Option<&str>)]) -> Pod {
        let c = |name: &str, disable: Option<&str>| {
            let mut c = json!({"name": name, "image": "x"});
            if let Some(v) = disable {
                c["env"] = json!([{"name": "CUDA_DISABLE_CONTROL", "value": v}]);
            }
            c
        };
        serde_json::from_value(json!({
            "metadata": {
                "name": "p", "namespace": "ns", "uid": "uid-1",
                "annotations": {ann::NVIDIA_DEVICES_TO_ALLOCATE: to_allocate},
            },
            "spec": {
                "initContainers": init.iter().map(|n| c(n, None)).collect::<Vec<_>>(),
                "containers": containers.iter().map(|(n, d)| c(n, *d)).collect::<Vec<_>>(),
            },
        }))
        .unwrap()
    }

    fn request(counts: &[usize]) -> AllocateRequest {
        AllocateRequest {
            container_requests: counts
                .iter()
                .map(|n| ContainerAllocateRequest {
                    devices_ids: (0..*n).map(|i| format!("GPU-a-{i}")).collect(),
                })
                .collect(),
        }
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("cache-{n}")
        }
    }

    fn env(r: &ContainerAllocateResponse) -> Vec<(String, String)> {
        let mut v: Vec<_> = r.envs.clone().into_iter().collect();
        v.sort();
        v
    }

    fn s(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn one_container_gets_hamis_env_and_mounts() {
        let p = pod("GPU-a,NVIDIA,3000,30:;", &[], &[("main", None)]);
        let plan = plan(&p, &request(&[1]), &cards(), &settings(), &mut ids()).unwrap();
        assert_eq!(plan.served.len(), 1);
        let r = &plan.served[0].response;
        assert_eq!(
            env(r),
            s(&[
                ("CUDA_DEVICE_MEMORY_LIMIT_0", "3000m"),
                (
                    "CUDA_DEVICE_MEMORY_SHARED_CACHE",
                    "/usr/local/vgpu/cache-1.cache"
                ),
                ("CUDA_DEVICE_SM_LIMIT", "30"),
                ("HAMI_LIMITS_FILE", "/usr/local/vgpu/limits/hami-limits"),
                ("LIBCUDA_LOG_LEVEL", "2"),
                ("NVIDIA_VISIBLE_DEVICES", "GPU-a"),
            ])
        );
        let m = |c: &str, h: &str, ro: bool| Mount {
            container_path: c.into(),
            host_path: h.into(),
            read_only: ro,
        };
        assert_eq!(
            r.mounts,
            vec![
                m(
                    "/usr/local/vgpu/libvgpu.so",
                    "/usr/local/vgpu/libvgpu.so",
                    true
                ),
                m(
                    "/usr/local/vgpu",
                    "/usr/local/vgpu/containers/uid-1_main",
                    false
                ),
                m(
                    "/usr/local/vgpu/limits",
                    "/usr/local/vgpu/limits/uid-1_main",
                    true
                ),
                m(
                    "/usr/local/vgpu/hami-limits",
                    "/usr/local/vgpu/limits/uid-1_main/hami-limits",
                    true
                ),
                m("/tmp/vgpulock", "/tmp/vgpulock", false),
                m("/etc/ld.so.preload", "/usr/local/vgpu/ld.so.preload", true),
            ]
        );
        assert!(r.devices.is_empty() && r.cdi_devices.is_empty());
        assert_eq!(
            plan.served[0].host_dir,
            Path::new("/usr/local/vgpu/containers/uid-1_main")
        );
        assert_eq!(
            plan.served[0].limits_dir,
            Path::new("/usr/local/vgpu/limits/uid-1_main")
        );
        // The limits dir is not inside the read-write per-container dir on
        // the host, so the container cannot write it.
        assert!(
            !plan.served[0]
                .limits_dir
                .starts_with(&plan.served[0].host_dir)
        );
        assert_eq!(plan.remaining.encode(), ";");
        assert!(plan.all_done());
        let l = &plan.served[0].limits;
        assert_eq!(l.memory_limit(0), 3000 << 20);
        assert_eq!(l.sm_limit(0), 30);
        assert_eq!(l.memory[1], None);
    }

    #[test]
    fn multi_card_container_lists_every_card_and_limit() {
        let p = pod(
            "GPU-b,NVIDIA,1000,0:GPU-c,NVIDIA,2000,0:;",
            &[],
            &[("main", None)],
        );
        let plan = plan(&p, &request(&[2]), &cards(), &settings(), &mut ids()).unwrap();
        let e = &plan.served[0].response.envs;
        assert_eq!(e["NVIDIA_VISIBLE_DEVICES"], "GPU-b,GPU-c");
        assert_eq!(e["CUDA_DEVICE_MEMORY_LIMIT_0"], "1000m");
        assert_eq!(e["CUDA_DEVICE_MEMORY_LIMIT_1"], "2000m");
        assert_eq!(e["CUDA_DEVICE_SM_LIMIT"], "0");
    }

    #[test]
    fn containers_are_taken_in_order_init_first_and_emptied() {
        let v = ";GPU-a,NVIDIA,100,10:;;GPU-b,NVIDIA,200,20:;";
        let p = pod(v, &["init0", "init1"], &[("app0", None), ("app1", None)]);
        let first = plan(&p, &request(&[1]), &cards(), &settings(), &mut ids()).unwrap();
        assert_eq!(first.served[0].container, "init1");
        assert_eq!(first.served[0].entry, 1);
        assert_eq!(first.remaining.encode(), ";;;GPU-b,NVIDIA,200,20:;");
        assert!(!first.all_done());
        // The pod as patched: the next call takes app1.
        let p = pod(
            &first.remaining.encode(),
            &["init0", "init1"],
            &[("app0", None), ("app1", None)],
        );
        let second = plan(&p, &request(&[1]), &cards(), &settings(), &mut ids()).unwrap();
        assert_eq!(second.served[0].container, "app1");
        assert_eq!(
            second.served[0].response.envs["NVIDIA_VISIBLE_DEVICES"],
            "GPU-b"
        );
        assert_eq!(second.remaining.encode(), ";;;;");
        assert!(second.all_done());
        // Two requests in one call take both.
        let p = pod(v, &["init0", "init1"], &[("app0", None), ("app1", None)]);
        let both = plan(&p, &request(&[1, 1]), &cards(), &settings(), &mut ids()).unwrap();
        let names: Vec<_> = both.served.iter().map(|s| s.container.as_str()).collect();
        assert_eq!(names, ["init1", "app1"]);
        assert!(both.all_done());
        let caches: Vec<_> = both
            .served
            .iter()
            .map(|s| s.response.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"].clone())
            .collect();
        assert_ne!(caches[0], caches[1], "one cache per container");
    }

    #[test]
    fn config_switches_and_opt_out() {
        let cfg = NvidiaConfig {
            device_memory_scaling: 1.5,
            disable_core_limit: true,
            lib_cuda_log_level: 4,
            ..Default::default()
        };
        let s = Settings::from_config(Path::new("/opt/hook"), &cfg);
        let p = pod("GPU-a,NVIDIA,10,5:;", &[], &[("main", Some("true"))]);
        let plan = plan(&p, &request(&[1]), &cards(), &s, &mut ids()).unwrap();
        let r = &plan.served[0].response;
        assert_eq!(r.envs["CUDA_OVERSUBSCRIBE"], "true");
        assert_eq!(r.envs["GPU_CORE_UTILIZATION_POLICY"], "disable");
        assert_eq!(r.envs["LIBCUDA_LOG_LEVEL"], "4");
        assert_eq!(
            r.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"],
            "/opt/hook/vgpu/cache-1.cache"
        );
        assert!(
            !r.mounts
                .iter()
                .any(|m| m.container_path == "/etc/ld.so.preload")
        );
        assert_eq!(
            r.mounts[1].host_path,
            "/opt/hook/vgpu/containers/uid-1_main"
        );
        assert_eq!(
            r.envs["HAMI_LIMITS_FILE"],
            "/opt/hook/vgpu/limits/hami-limits"
        );
        assert_eq!(
            (
                r.mounts[2].container_path.as_str(),
                r.mounts[2].host_path.as_str(),
                r.mounts[2].read_only
            ),
            (
                "/opt/hook/vgpu/limits",
                "/opt/hook/vgpu/limits/uid-1_main",
                true
            )
        );
        // Go's ParseBool: "yes" is not true; the preload stays.
        let p = pod("GPU-a,NVIDIA,10,5:;", &[], &[("main", Some("yes"))]);
        let plan = super::plan(&p, &request(&[1]), &cards(), &s, &mut ids()).unwrap();
        assert!(
            plan.served[0]
                .response
                .mounts
                .iter()
                .any(|m| m.container_path == "/etc/ld.so.preload")
        );
        // An operator who does not allow opting out keeps the preload.
        let strict = Settings {
            allow_disable_control: false,
            ..s
        };
        let p = pod("GPU-a,NVIDIA,10,5:;", &[], &[("main", Some("1"))]);
        let plan = super::plan(&p, &request(&[1]), &cards(), &strict, &mut ids()).unwrap();
        assert_eq!(plan.served[0].response.mounts.len(), 6);
    }

    #[test]
    fn library_path_prefers_the_versioned_file() {
        let h = Path::new("/usr/local");
        assert_eq!(
            Settings::library_path(h, "0.1.0", true),
            Path::new("/usr/local/vgpu/libvgpu.so.0.1.0")
        );
        assert_eq!(
            Settings::library_path(h, "0.1.0", false),
            Path::new("/usr/local/vgpu/libvgpu.so")
        );
    }

    #[test]
    fn errors_name_the_pod_and_the_value() {
        let run = |p: &Pod, counts: &[usize]| {
            plan(p, &request(counts), &cards(), &settings(), &mut ids()).unwrap_err()
        };
        let mut p = pod("x", &[], &[("main", None)]);
        p.metadata.annotations = None;
        assert_eq!(
            run(&p, &[1]).to_string(),
            "pod ns/p has no hami.io/vgpu-devices-to-allocate annotation"
        );
        let e = run(&pod("GPU-a,NVIDIA,lots,5:;", &[], &[("main", None)]), &[1]);
        assert!(
            e.to_string()
                .contains("hami.io/vgpu-devices-to-allocate: \"GPU-a,NVIDIA,lots,5\""),
            "{e}"
        );
        let e = run(&pod(";", &[], &[("main", None)]), &[1]);
        assert_eq!(
            e.to_string(),
            "pod ns/p: hami.io/vgpu-devices-to-allocate=\";\" has no container left to allocate"
        );
        let e = run(&pod("GPU-a,NVIDIA,10,5:;", &[], &[("main", None)]), &[2]);
        assert_eq!(
            e.to_string(),
            "pod ns/p container main: hami.io/vgpu-devices-to-allocate gives 1 devices but the Allocate request asks for 2"
        );
        let e = run(&pod(";GPU-a,NVIDIA,10,5:;", &[], &[("main", None)]), &[1]);
        assert!(
            matches!(
                e,
                AllocError::NoSuchContainer {
                    entry: 1,
                    containers: 1,
                    ..
                }
            ),
            "{e}"
        );
        let e = run(&pod("GPU-z,NVIDIA,10,5:;", &[], &[("main", None)]), &[1]);
        assert_eq!(
            e.to_string(),
            "pod ns/p container main: hami.io/vgpu-devices-to-allocate names card GPU-z, which this node does not have"
        );
        // Two requests but one container left.
        let e = run(&pod("GPU-a,NVIDIA,10,5:;", &[], &[("main", None)]), &[1, 1]);
        assert!(matches!(e, AllocError::NothingLeft { .. }), "{e}");
    }
}
