//! Allocation without the node lock, through the kubelet's
//! PreStartContainer and PodResources API (`--allocation-mode
//! pod-resources`).
//!
//! The kubelet's Allocate names device IDs, not the pod: HAMi's protocol
//! therefore binds one pod per node at a time and lets Allocate take the
//! pod that holds the node lock. Here Allocate answers without looking for
//! the pod: it mounts two host paths keyed by the device IDs (a hash of the
//! sorted IDs, [`alloc_key`]), `<vgpu>/alloc/<key>.dir` and `<key>.limits`,
//! and nothing else container-specific. The kubelet then calls
//! PreStartContainer with the same IDs before it creates the container;
//! the kubelet's PodResources API says which pod and container received
//! them ([`find_owner`]), the pod's allocation annotation (written by
//! hami-scheduler in the Binding) gives that container's cards and limits
//! ([`prestart_plan`]), and the two paths become symlinks to the
//! container's usual dirs (`containers/<uid>_<name>`,
//! `limits/<uid>_<name>`), filled first. The runtime resolves the symlinks
//! when it mounts them.
//!
//! If PreStartContainer never runs, the paths do not exist when the
//! runtime creates the container: containerd makes empty dirs there, the
//! container gets an empty limits dir, and the interposer refuses device
//! memory because its limits file is missing (fail closed).

use std::fmt;
use std::path::{Path, PathBuf};

use hami_api::DeviceInfo;
use hami_api::allocation::PodDevices;
use hami_api::annotations as ann;
use k8s_openapi::api::core::v1::Pod;

use crate::allocate::{
    self, MountStyle, NVIDIA_VISIBLE_DEVICES, Served, Settings, common_env, common_mounts,
    container_limits,
};
use crate::pending::{PodStore, annotation};
use crate::proto::ContainerAllocateResponse;
use crate::proto_podresources::ListPodResourcesResponse;

/// Name of the host dir, under `<hook>/vgpu`, of the per-allocation links.
pub const ALLOC_DIR_NAME: &str = "alloc";

/// The key of one container's device IDs: the first 20 hex digits of the
/// SHA-256 of the sorted IDs, one per line. The kubelet never gives the
/// same ID to two live containers, so the key names one container at a
/// time.
pub fn alloc_key(ids: &[String]) -> String {
    let mut sorted: Vec<&str> = ids.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let digest = ring::digest::digest(&ring::digest::SHA256, sorted.join("\n").as_bytes());
    digest.as_ref()[..10]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The host paths Allocate mounts for one allocation key: the
/// per-container dir's link and the limits dir's link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocLinks {
    pub dir: PathBuf,
    pub limits: PathBuf,
}

impl AllocLinks {
    pub fn new(settings: &Settings, key: &str) -> AllocLinks {
        let base = settings.vgpu_dir().join(ALLOC_DIR_NAME);
        AllocLinks {
            dir: base.join(format!("{key}.dir")),
            limits: base.join(format!("{key}.limits")),
        }
    }
}

/// Allocate's answer for one container request without knowing the pod:
/// the interposer, the two per-allocation paths, the shared region named
/// after the key, and every card of the node visible (which of them the
/// container may use is in its limits file, written at PreStartContainer).
pub fn allocate_response(
    settings: &Settings,
    cards: &[DeviceInfo],
    ids: &[String],
) -> ContainerAllocateResponse {
    let key = alloc_key(ids);
    let links = AllocLinks::new(settings, &key);
    let mut envs = common_env(settings, &key);
    let visible: Vec<&str> = cards.iter().map(|c| c.id.as_str()).collect();
    envs.insert(NVIDIA_VISIBLE_DEVICES.to_string(), visible.join(","));
    // The container's own env is not known here: CUDA_DISABLE_CONTROL
    // cannot drop the preload mount in this mode.
    let mounts = common_mounts(
        settings,
        &links.dir,
        &links.limits,
        MountStyle::DirsOnly,
        true,
    );
    ContainerAllocateResponse {
        envs,
        mounts,
        ..Default::default()
    }
}

/// The container that received some device IDs, as the kubelet says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} container {}",
            self.namespace, self.pod, self.container
        )
    }
}

/// Why PreStartContainer cannot give a container its limits. Every message
/// names the pod (or pods) and the value at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreStartError {
    /// No container holds exactly these IDs; `holders` hold some of them.
    NoOwner {
        ids: Vec<String>,
        holders: Vec<Owner>,
    },
    /// The pod the kubelet names is not (or no longer) in the API.
    PodGone { owner: Owner },
    /// The pod is not bound here by hami-scheduler.
    NotBoundHere {
        owner: Owner,
        bound_to: String,
        vgpu_node: String,
    },
    /// No allocation annotation, or one that does not decode.
    NoAllocation { owner: Owner, detail: String },
    /// The container has no entry (or an empty one) in the annotation.
    NoEntry { owner: Owner },
    /// The kubelet gave another number of devices than the scheduler.
    CountMismatch {
        owner: Owner,
        annotated: usize,
        ids: Vec<String>,
    },
    /// The scheduler gave a card this node does not have.
    UnknownCard { owner: Owner, uuid: String },
    /// The pod has no uid.
    NoUid { owner: Owner },
}

impl fmt::Display for PreStartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = ann::NVIDIA_DEVICES_ALLOCATED;
        match self {
            PreStartError::NoOwner { ids, holders } if holders.is_empty() => write!(
                f,
                "no container holds devices {ids:?} in the kubelet's PodResources"
            ),
            PreStartError::NoOwner { ids, holders } => {
                let names: Vec<String> = holders.iter().map(Owner::to_string).collect();
                write!(
                    f,
                    "no container holds exactly devices {ids:?} in the kubelet's PodResources; some of them are held by {}",
                    names.join(", ")
                )
            }
            PreStartError::PodGone { owner } => write!(
                f,
                "the kubelet gave these devices to pod {owner}, which the API server does not list"
            ),
            PreStartError::NotBoundHere {
                owner,
                bound_to,
                vgpu_node,
            } => write!(
                f,
                "pod {owner}: bound to node {bound_to:?} with {} {vgpu_node:?}, not allocated by hami-scheduler to this node",
                ann::VGPU_NODE
            ),
            PreStartError::NoAllocation { owner, detail } => {
                write!(f, "pod {owner}: {key}: {detail}")
            }
            PreStartError::NoEntry { owner } => write!(
                f,
                "pod {owner}: {key} gives this container no device, but the kubelet gave it devices"
            ),
            PreStartError::CountMismatch {
                owner,
                annotated,
                ids,
            } => write!(
                f,
                "pod {owner}: {key} gives {annotated} devices but the kubelet gave {} ({ids:?})",
                ids.len()
            ),
            PreStartError::UnknownCard { owner, uuid } => write!(
                f,
                "pod {owner}: {key} names card {uuid}, which this node does not have"
            ),
            PreStartError::NoUid { owner } => write!(f, "pod {owner} has no uid"),
        }
    }
}

impl std::error::Error for PreStartError {}

fn sorted(ids: &[String]) -> Vec<&str> {
    let mut v: Vec<&str> = ids.iter().map(String::as_str).collect();
    v.sort_unstable();
    v
}

/// The container whose devices of `resource` are exactly `ids`, in a
/// PodResources List answer.
pub fn find_owner(
    list: &ListPodResourcesResponse,
    resource: &str,
    ids: &[String],
) -> Result<Owner, PreStartError> {
    let wanted = sorted(ids);
    let mut holders = Vec::new();
    for pod in &list.pod_resources {
        for c in &pod.containers {
            let held: Vec<String> = c
                .devices
                .iter()
                .filter(|d| d.resource_name == resource)
                .flat_map(|d| d.device_ids.iter().cloned())
                .collect();
            let owner = || Owner {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                container: c.name.clone(),
            };
            if sorted(&held) == wanted {
                return Ok(owner());
            }
            if held.iter().any(|h| ids.contains(h)) {
                holders.push(owner());
            }
        }
    }
    Err(PreStartError::NoOwner {
        ids: ids.to_vec(),
        holders,
    })
}

/// What PreStartContainer does for one container.
#[derive(Debug, Clone, PartialEq)]
pub struct PreStart {
    /// The container's dirs, limits and files, as Allocate would write them
    /// under the lock.
    pub served: Served,
    /// The links to point at `served`'s dirs.
    pub links: AllocLinks,
    /// `hami.io/vgpu-devices-to-allocate` with this container's entry
    /// emptied, when that changes it (a restarted container: no change).
    pub remaining: Option<PodDevices>,
}

impl PreStart {
    /// Whether the pod has no container left to start for the first time.
    pub fn all_done(&self) -> bool {
        self.remaining.as_ref().is_some_and(PodDevices::is_empty)
    }
}

/// What a pod's allocation gives one of its containers on this node.
struct Given {
    uid: String,
    entry: usize,
    devices: hami_api::allocation::ContainerDevices,
    /// `to-allocate` with this entry emptied, when that changes it.
    remaining: Option<PodDevices>,
}

/// The container `owner` names, from the pod's
/// `hami.io/vgpu-devices-allocated` (written by hami-scheduler in the
/// Binding; tenants cannot write it), checked against this node. `None`
/// when the allocation gives that container no device.
fn given(
    pod: &Pod,
    owner: &Owner,
    node: &str,
    cards: &[DeviceInfo],
) -> Result<Option<Given>, PreStartError> {
    let owner_err = || owner.clone();
    let bound_to = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or_default();
    let vgpu_node = annotation(pod, ann::VGPU_NODE).unwrap_or_default();
    if bound_to != node || vgpu_node != node {
        return Err(PreStartError::NotBoundHere {
            owner: owner_err(),
            bound_to: bound_to.to_string(),
            vgpu_node: vgpu_node.to_string(),
        });
    }
    let uid = pod
        .metadata
        .uid
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| PreStartError::NoUid { owner: owner_err() })?;
    let allocated = annotation(pod, ann::NVIDIA_DEVICES_ALLOCATED).ok_or_else(|| {
        PreStartError::NoAllocation {
            owner: owner_err(),
            detail: "not set (the pod was not bound by hami-scheduler)".into(),
        }
    })?;
    let allocated = PodDevices::decode(ann::NVIDIA_DEVICES_ALLOCATED, allocated).map_err(|e| {
        PreStartError::NoAllocation {
            owner: owner_err(),
            detail: e.to_string(),
        }
    })?;
    let Some(entry) = allocate::container_index(pod, &owner.container) else {
        return Ok(None);
    };
    let Some(devices) = allocated.0.get(entry).filter(|d| !d.is_empty()).cloned() else {
        return Ok(None);
    };
    if let Some(d) = devices
        .iter()
        .find(|d| !cards.iter().any(|c| c.id == d.uuid))
    {
        return Err(PreStartError::UnknownCard {
            owner: owner_err(),
            uuid: d.uuid.clone(),
        });
    }
    // The same to-allocate bookkeeping as HAMi's Allocate: this entry
    // emptied, `success` once every entry is.
    let remaining = annotation(pod, ann::NVIDIA_DEVICES_TO_ALLOCATE)
        .and_then(|v| PodDevices::decode(ann::NVIDIA_DEVICES_TO_ALLOCATE, v).ok())
        .and_then(|mut left| {
            let e = left.0.get_mut(entry)?;
            if e.is_empty() {
                return None;
            }
            e.clear();
            Some(left)
        });
    Ok(Some(Given {
        uid: uid.to_string(),
        entry,
        devices,
        remaining,
    }))
}

impl Given {
    /// The container's host side with `response` as its answer.
    fn served(
        self,
        settings: &Settings,
        container: &str,
        response: ContainerAllocateResponse,
    ) -> (Served, Option<PodDevices>) {
        let uuids: Vec<&str> = allocate::card_uuids(&self.devices);
        let served = Served {
            container: container.to_string(),
            entry: self.entry,
            host_dir: settings.container_dir(&self.uid, container),
            limits_dir: settings.limits_dir(&self.uid, container),
            limits: container_limits(&self.devices),
            sim_devices: settings.sim.as_ref().map(|sim| sim.devices_for(&uuids)),
            devices: self.devices,
            response,
        };
        (served, self.remaining)
    }
}

/// PreStartContainer for the container `owner` names, which received
/// `ids`: its cards and limits from the pod's allocation, checked against
/// this node and the kubelet's count.
pub fn prestart_plan(
    pod: &Pod,
    owner: &Owner,
    node: &str,
    ids: &[String],
    cards: &[DeviceInfo],
    settings: &Settings,
) -> Result<PreStart, PreStartError> {
    let given = given(pod, owner, node, cards)?.ok_or_else(|| PreStartError::NoEntry {
        owner: owner.clone(),
    })?;
    if given.devices.len() != ids.len() {
        return Err(PreStartError::CountMismatch {
            owner: owner.clone(),
            annotated: given.devices.len(),
            ids: ids.to_vec(),
        });
    }
    let (served, remaining) = given.served(
        settings,
        &owner.container,
        allocate_response(settings, cards, ids),
    );
    Ok(PreStart {
        served,
        links: AllocLinks::new(settings, &alloc_key(ids)),
        remaining,
    })
}

/// What NRI's CreateContainer does for one container (`--allocation-mode
/// nri`): the container's dirs and limits as Allocate writes them under
/// the lock, and HAMi's full answer (its cards only in
/// `NVIDIA_VISIBLE_DEVICES`, its limits, its mounts) to apply as the
/// runtime's adjustment. `None` when the allocation gives the container no
/// device (a sidecar, a pod of another scheduler).
pub fn nri_plan(
    pod: &Pod,
    owner: &Owner,
    node: &str,
    cards: &[DeviceInfo],
    settings: &Settings,
    cache_id: &str,
) -> Result<Option<(Served, Option<PodDevices>)>, PreStartError> {
    let Some(given) = given(pod, owner, node, cards)? else {
        return Ok(None);
    };
    let spec = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|s| {
            s.init_containers
                .iter()
                .flatten()
                .chain(s.containers.iter())
        })
        .find(|c| c.name == owner.container)
        .cloned()
        .unwrap_or_default();
    let response =
        allocate::container_response(settings, &given.uid, &spec, &given.devices, cache_id);
    Ok(Some(given.served(settings, &owner.container, response)))
}

/// A container's allocation can never work (`reason`): the pod's bind is
/// marked failed with an event, once (the kubelet or runtime retries the
/// start, which must not write the same event again and again).
pub async fn fail_once(store: &dyn PodStore, pod: &Pod, reason: &str) {
    if annotation(pod, ann::BIND_PHASE) != Some("failed") {
        store.fail(pod, reason).await;
    }
}

/// Records that a container got its limits, when that changes the pod
/// (`remaining` is `to-allocate` with its entry emptied): `success` once no
/// entry is left, and the node lock released if `node_lock` names the pod
/// (a scheduler speaking HAMi's protocol locked the node for it).
pub async fn record_started(
    store: &dyn PodStore,
    pod: &Pod,
    remaining: Option<&PodDevices>,
    node_lock: Option<&str>,
) -> Result<(), crate::pending::StoreError> {
    match remaining {
        Some(left) => {
            store
                .started(pod, left, left.is_empty(), lock_names(node_lock, pod))
                .await
        }
        None => Ok(()),
    }
}

/// Whether the node lock value `lock` names `pod` (a scheduler speaking
/// HAMi's protocol bound it and waits for the lock to go).
pub fn lock_names(lock: Option<&str>, pod: &Pod) -> bool {
    lock.and_then(|v| hami_api::node::NodeLock::decode(v).ok())
        .is_some_and(|l| {
            Some(l.namespace.as_str()) == pod.metadata.namespace.as_deref()
                && Some(l.pod.as_str()) == pod.metadata.name.as_deref()
        })
}

/// Points `link` at `target`, replacing whatever is there (an older link,
/// or the empty dir a runtime made when no PreStartContainer came): a
/// temporary symlink renamed over it.
pub fn point(link: &Path, target: &Path) -> std::io::Result<()> {
    let ctx = |what: &str, p: &Path, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    let parent = link.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).map_err(|e| ctx("creating", parent, e))?;
    if let Ok(md) = std::fs::symlink_metadata(link)
        && md.is_dir()
    {
        std::fs::remove_dir_all(link).map_err(|e| ctx("removing", link, e))?;
    }
    let name = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(|e| ctx("linking", &tmp, e))?;
    std::fs::rename(&tmp, link).map_err(|e| ctx("renaming onto", link, e))
}

/// Removes the links of `ids` (Allocate: a new container with these IDs
/// must not mount a previous owner's dirs before its PreStartContainer).
pub fn unlink(links: &AllocLinks) -> std::io::Result<()> {
    for p in [&links.dir, &links.limits] {
        match std::fs::symlink_metadata(p) {
            Ok(md) if md.is_dir() => std::fs::remove_dir_all(p)?,
            Ok(_) => std::fs::remove_file(p)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto_podresources::{ContainerDevices, ContainerResources, PodResources};
    use hami_api::NvidiaConfig;
    use serde_json::json;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn settings() -> Settings {
        Settings::from_config(Path::new("/usr/local"), &NvidiaConfig::default())
    }

    fn cards() -> Vec<DeviceInfo> {
        ["GPU-a", "GPU-b"]
            .iter()
            .map(|id| DeviceInfo {
                id: id.to_string(),
                count: 10,
                health: true,
                ..Default::default()
            })
            .collect()
    }

    fn list(entries: &[(&str, &str, &str, &[&str])]) -> ListPodResourcesResponse {
        ListPodResourcesResponse {
            pod_resources: entries
                .iter()
                .map(|(ns, pod, c, ids)| PodResources {
                    name: pod.to_string(),
                    namespace: ns.to_string(),
                    containers: vec![ContainerResources {
                        name: c.to_string(),
                        devices: vec![
                            ContainerDevices {
                                resource_name: "nvidia.com/gpu".into(),
                                device_ids: ids.iter().map(|s| s.to_string()).collect(),
                            },
                            ContainerDevices {
                                resource_name: "example.com/other".into(),
                                device_ids: vec!["x".into()],
                            },
                        ],
                    }],
                })
                .collect(),
        }
    }

    fn pod(node: &str, allocated: &str, to_allocate: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "uid-1", "annotations": {
                ann::VGPU_NODE: node,
                ann::NVIDIA_DEVICES_ALLOCATED: allocated,
                ann::NVIDIA_DEVICES_TO_ALLOCATE: to_allocate,
            }},
            "spec": {"nodeName": node, "initContainers": [{"name": "init", "image": "x"}],
                     "containers": [{"name": "main", "image": "x"}, {"name": "side", "image": "x"}]},
        }))
        .unwrap()
    }

    fn owner(c: &str) -> Owner {
        Owner {
            namespace: "ns".into(),
            pod: "p".into(),
            container: c.into(),
        }
    }

    /// PreStartContainer's plan for container `c` of `p` on node n1.
    fn plan_for(p: &Pod, c: &str, i: &[&str]) -> PreStart {
        prestart_plan(p, &owner(c), "n1", &ids(i), &cards(), &settings()).unwrap()
    }

    #[test]
    fn the_key_depends_on_the_set_of_ids_only() {
        let k = alloc_key(&ids(&["GPU-a-1", "GPU-b-3"]));
        assert_eq!(k, alloc_key(&ids(&["GPU-b-3", "GPU-a-1"])));
        assert_ne!(k, alloc_key(&ids(&["GPU-a-1"])));
        assert_eq!(k.len(), 20);
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn allocate_mounts_links_named_by_the_ids_and_no_container_limits() {
        let r = allocate_response(&settings(), &cards(), &ids(&["GPU-a-0"]));
        let key = alloc_key(&ids(&["GPU-a-0"]));
        let mounts: Vec<(&str, &str, bool)> = r
            .mounts
            .iter()
            .map(|m| (m.container_path.as_str(), m.host_path.as_str(), m.read_only))
            .collect();
        let dir = format!("/usr/local/vgpu/alloc/{key}.dir");
        let limits = format!("/usr/local/vgpu/alloc/{key}.limits");
        assert_eq!(
            mounts,
            vec![
                (
                    "/usr/local/vgpu/libvgpu.so",
                    "/usr/local/vgpu/libvgpu.so",
                    true
                ),
                ("/usr/local/vgpu", dir.as_str(), false),
                ("/usr/local/vgpu/limits", limits.as_str(), true),
                ("/tmp/vgpulock", "/tmp/vgpulock", false),
                ("/etc/ld.so.preload", "/usr/local/vgpu/ld.so.preload", true),
            ]
        );
        assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], "GPU-a,GPU-b");
        assert_eq!(
            r.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"],
            format!("/usr/local/vgpu/{key}.cache")
        );
        assert_eq!(
            r.envs["HAMI_LIMITS_FILE"],
            "/usr/local/vgpu/limits/hami-limits"
        );
        assert!(
            !r.envs
                .keys()
                .any(|k| k.starts_with("CUDA_DEVICE_MEMORY_LIMIT") || k == "CUDA_DEVICE_SM_LIMIT"),
            "limits come from the limits file only: {:?}",
            r.envs
        );
    }

    #[test]
    fn the_owner_holds_exactly_the_ids() {
        let l = list(&[
            ("ns", "a", "c", &["GPU-a-0"]),
            ("ns", "b", "c", &["GPU-a-1", "GPU-b-1"]),
        ]);
        assert_eq!(
            find_owner(&l, "nvidia.com/gpu", &ids(&["GPU-b-1", "GPU-a-1"])).unwrap(),
            Owner {
                namespace: "ns".into(),
                pod: "b".into(),
                container: "c".into()
            }
        );
        let err = find_owner(&l, "nvidia.com/gpu", &ids(&["GPU-a-1"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no container holds exactly devices [\"GPU-a-1\"] in the kubelet's PodResources; some of them are held by ns/b container c"
        );
        // Another resource's IDs never match.
        assert!(find_owner(&l, "example.com/other", &ids(&["GPU-a-0"])).is_err());
    }

    #[test]
    fn prestart_takes_the_containers_entry_by_name() {
        let p = pod(
            "n1",
            ";GPU-a,NVIDIA,1000,30:;GPU-b,NVIDIA,2000,0:;",
            ";GPU-a,NVIDIA,1000,30:;GPU-b,NVIDIA,2000,0:;",
        );
        let ps = plan_for(&p, "side", &["GPU-b-4"]);
        assert_eq!(ps.served.entry, 2);
        assert_eq!(ps.served.devices[0].uuid, "GPU-b");
        assert_eq!(ps.served.limits.memory_limit(0), 2000 << 20);
        assert_eq!(
            ps.served.limits_dir,
            Path::new("/usr/local/vgpu/limits/uid-1_side")
        );
        assert_eq!(
            ps.remaining.as_ref().unwrap().encode(),
            ";GPU-a,NVIDIA,1000,30:;;"
        );
        assert!(!ps.all_done());
        // The last container: the pod is done.
        let p = pod("n1", ";GPU-a,NVIDIA,1000,30:;;", ";GPU-a,NVIDIA,1000,30:;;");
        let ps = plan_for(&p, "main", &["GPU-a-0"]);
        assert!(ps.all_done());
        // A restarted container: its entry is empty already, nothing to record.
        let p = pod("n1", ";GPU-a,NVIDIA,1000,30:;;", ";;;");
        let ps = plan_for(&p, "main", &["GPU-a-0"]);
        assert_eq!(ps.remaining, None);
        assert_eq!(ps.served.limits.memory_limit(0), 1000 << 20);
    }

    #[test]
    fn prestart_refuses_what_does_not_add_up() {
        let p = pod("n1", ";GPU-a,NVIDIA,1000,30:;;", ";GPU-a,NVIDIA,1000,30:;;");
        let run = |p: &Pod, c: &str, node: &str, i: &[&str]| {
            prestart_plan(p, &owner(c), node, &ids(i), &cards(), &settings())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            run(&p, "main", "n2", &["GPU-a-0"]),
            "pod ns/p container main: bound to node \"n1\" with hami.io/vgpu-node \"n1\", not allocated by hami-scheduler to this node"
        );
        assert_eq!(
            run(&p, "side", "n1", &["GPU-a-0"]),
            "pod ns/p container side: hami.io/vgpu-devices-allocated gives this container no device, but the kubelet gave it devices"
        );
        assert_eq!(
            run(&p, "main", "n1", &["GPU-a-0", "GPU-a-1"]),
            "pod ns/p container main: hami.io/vgpu-devices-allocated gives 1 devices but the kubelet gave 2 ([\"GPU-a-0\", \"GPU-a-1\"])"
        );
        let p = pod("n1", ";GPU-z,NVIDIA,1000,30:;;", ";;;");
        assert_eq!(
            run(&p, "main", "n1", &["GPU-a-0"]),
            "pod ns/p container main: hami.io/vgpu-devices-allocated names card GPU-z, which this node does not have"
        );
        let mut p = pod("n1", "", "");
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(ann::NVIDIA_DEVICES_ALLOCATED);
        assert_eq!(
            run(&p, "main", "n1", &["GPU-a-0"]),
            "pod ns/p container main: hami.io/vgpu-devices-allocated: not set (the pod was not bound by hami-scheduler)"
        );
    }

    #[test]
    fn links_replace_links_and_runtime_made_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("alloc/k.limits");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        point(&link, &a).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), a);
        point(&link, &b).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), b);
        // A dir the runtime made (no PreStartContainer came) is replaced.
        let links = AllocLinks {
            dir: dir.path().join("alloc/k.dir"),
            limits: link.clone(),
        };
        unlink(&links).unwrap();
        std::fs::create_dir_all(link.join("hami-limits")).unwrap();
        point(&link, &a).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), a);
        unlink(&links).unwrap();
        assert!(std::fs::symlink_metadata(&link).is_err());
        assert!(a.is_dir(), "unlinking never touches the target");
    }
}
