//! Builders for the engine's integration tests: Kubernetes Nodes and Pods as
//! the API server would hand them over, and a few helpers that run the
//! engine end to end (prepare, filter, reserve).
#![allow(dead_code)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, Node, Pod, PodSpec, PodStatus, ResourceRequirements, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use hami_api::annotations as ann;
use hami_api::device::encode_devices_json;
use hami_api::{DeviceInfo, DeviceMode, NvidiaConfig, PodDevices};
use hami_sched::{Decision, Engine, Mode, PodRequest, Policies, Snapshot};

pub const GPU: &str = "nvidia.com/gpu";
pub const MEM: &str = "nvidia.com/gpumem";
pub const PCT: &str = "nvidia.com/gpumem-percentage";
pub const CORES: &str = "nvidia.com/gpucores";
pub const PRIO: &str = "nvidia.com/priority";

/// A healthy hami-core card: 10 slots, 100 cores.
pub fn card(id: &str, ty: &str, mem: u64) -> DeviceInfo {
    DeviceInfo {
        id: id.into(),
        count: 10,
        devmem: mem,
        devcore: 100,
        device_type: ty.into(),
        health: true,
        ..Default::default()
    }
}

pub fn t4(id: &str) -> DeviceInfo {
    card(id, "NVIDIA-Tesla T4", 15360)
}

pub fn a100(id: &str) -> DeviceInfo {
    card(id, "NVIDIA-A100-SXM4-80GB", 81920)
}

pub fn with_numa(mut d: DeviceInfo, numa: i32) -> DeviceInfo {
    d.numa = numa;
    d
}

pub fn with_mode(mut d: DeviceInfo, mode: DeviceMode) -> DeviceInfo {
    d.mode = Some(mode);
    d
}

pub fn with_count(mut d: DeviceInfo, count: u32) -> DeviceInfo {
    d.count = count;
    d
}

/// A Kubernetes Node registering `devices` (JSON form) plus extra annotations.
pub fn node_with(name: &str, devices: &[DeviceInfo], extra: &[(&str, &str)]) -> Node {
    let mut a = BTreeMap::new();
    a.insert(
        ann::NODE_NVIDIA_REGISTER.to_string(),
        encode_devices_json(devices),
    );
    for (k, v) in extra {
        a.insert(k.to_string(), v.to_string());
    }
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(a),
            ..Default::default()
        },
        ..Default::default()
    }
}

pub fn node(name: &str, devices: &[DeviceInfo]) -> Node {
    node_with(name, devices, &[])
}

pub fn limits(kv: &[(&str, &str)]) -> Option<ResourceRequirements> {
    Some(ResourceRequirements {
        limits: Some(
            kv.iter()
                .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                .collect(),
        ),
        ..Default::default()
    })
}

pub fn container(name: &str, kv: &[(&str, &str)]) -> Container {
    Container {
        name: name.into(),
        resources: if kv.is_empty() { None } else { limits(kv) },
        ..Default::default()
    }
}

/// A Pod under construction.
#[derive(Clone)]
pub struct PodB {
    pod: Pod,
}

pub fn pod(name: &str) -> PodB {
    PodB {
        pod: Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(PodSpec::default()),
            ..Default::default()
        },
    }
}

/// A one-container pod asking for `kv`.
pub fn gpu_pod(name: &str, kv: &[(&str, &str)]) -> Pod {
    pod(name).ctr(kv).build()
}

impl PodB {
    pub fn ctr(mut self, kv: &[(&str, &str)]) -> Self {
        let spec = self.pod.spec.as_mut().unwrap();
        let n = spec.containers.len();
        spec.containers.push(container(&format!("c{n}"), kv));
        self
    }

    pub fn init(mut self, kv: &[(&str, &str)]) -> Self {
        let spec = self.pod.spec.as_mut().unwrap();
        let v = spec.init_containers.get_or_insert_with(Vec::new);
        let n = v.len();
        v.push(container(&format!("init{n}"), kv));
        self
    }

    pub fn privileged(mut self) -> Self {
        let spec = self.pod.spec.as_mut().unwrap();
        spec.containers.last_mut().unwrap().security_context = Some(SecurityContext {
            privileged: Some(true),
            ..Default::default()
        });
        self
    }

    pub fn ann(mut self, k: &str, v: &str) -> Self {
        self.pod
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(k.into(), v.into());
        self
    }

    pub fn ns(mut self, ns: &str) -> Self {
        self.pod.metadata.namespace = Some(ns.into());
        self
    }

    pub fn phase(mut self, phase: &str) -> Self {
        self.pod.status = Some(PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
        self
    }

    pub fn scheduler(mut self, name: &str) -> Self {
        self.pod.spec.as_mut().unwrap().scheduler_name = Some(name.into());
        self
    }

    pub fn node_name(mut self, name: &str) -> Self {
        self.pod.spec.as_mut().unwrap().node_name = Some(name.into());
        self
    }

    /// Gives the pod the scheduler's annotations for `node` holding
    /// `allocated` (annotation form), without binding it.
    pub fn annotated(self, node: &str, allocated: &str) -> Self {
        self.ann(ann::VGPU_NODE, node)
            .ann(ann::NVIDIA_DEVICES_ALLOCATED, allocated)
            .ann(ann::NVIDIA_DEVICES_TO_ALLOCATE, allocated)
    }

    /// Marks the pod bound to `node` holding `allocated`: the annotations
    /// plus `spec.nodeName`, as a bound pod has them.
    pub fn bound(self, node: &str, allocated: &str) -> Self {
        self.annotated(node, allocated).node_name(node)
    }

    pub fn build(self) -> Pod {
        self.pod
    }
}

pub fn engine() -> Engine {
    Engine::default()
}

pub fn engine_with(config: NvidiaConfig, policies: Policies) -> Engine {
    Engine::new(config, policies)
}

pub fn snapshot(engine: &Engine, nodes: &[Node]) -> Snapshot {
    let mut s = Snapshot::new();
    for n in nodes {
        assert!(engine.add_node(&mut s, n).expect("node decodes"));
    }
    s
}

pub fn request(engine: &Engine, pod: &Pod) -> PodRequest {
    engine
        .prepare(pod)
        .expect("pod parses")
        .expect("pod asks for GPUs")
}

/// A decision, owned, for assertions.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub node: Option<String>,
    pub devices: PodDevices,
    /// Rejected node -> HAMi-formatted reason.
    pub rejected: BTreeMap<String, String>,
}

impl Outcome {
    pub fn from(d: &Decision<'_>) -> Outcome {
        Outcome {
            node: d.node.map(str::to_string),
            devices: d.devices.clone(),
            rejected: d
                .rejected
                .iter()
                .map(|(n, r)| (n.to_string(), r.to_string()))
                .collect(),
        }
    }

    /// UUIDs per container.
    pub fn uuids(&self) -> Vec<Vec<String>> {
        self.devices
            .0
            .iter()
            .map(|c| c.iter().map(|d| d.uuid.clone()).collect())
            .collect()
    }

    /// The UUID of the only device of the only GPU container.
    pub fn one(&self) -> String {
        let all: Vec<String> = self.uuids().into_iter().flatten().collect();
        assert_eq!(all.len(), 1, "expected one device, got {all:?}");
        all[0].clone()
    }

    pub fn reason(&self, node: &str) -> &str {
        self.rejected
            .get(node)
            .unwrap_or_else(|| panic!("{node} was not rejected: {self:?}"))
    }
}

/// Filters one pod over the whole snapshot, explaining every rejection.
pub fn decide(engine: &Engine, s: &Snapshot, pod: &Pod) -> Outcome {
    let req = request(engine, pod);
    let d = engine.filter(s, &req, None, Mode::Explain);
    let fast = engine.filter(s, &req, None, Mode::Fast);
    assert_eq!(
        (d.node, &d.devices),
        (fast.node, &fast.devices),
        "Explain and Fast disagree"
    );
    Outcome::from(&d)
}

/// Decides and, when placed, reserves the pod in the snapshot.
pub fn place(engine: &Engine, s: &mut Snapshot, pod: &Pod) -> Outcome {
    let out = decide(engine, s, pod);
    if let Some(n) = &out.node {
        let req = request(engine, pod);
        engine.reserve(s, &req, n, out.devices.clone());
    }
    out
}

/// Used slots, MiB and cores of a card.
pub fn used(s: &Snapshot, node: &str, uuid: &str) -> (u32, u64, u32) {
    let n = s.node(node).expect("node known");
    let d = n
        .devices
        .iter()
        .find(|d| d.info.id == uuid)
        .expect("card known");
    (d.used.slots, d.used.mem, d.used.cores)
}

/// Records a running pod on `node` holding `allocated` (annotation form).
pub fn hold(s: &mut Snapshot, key: &str, node: &str, allocated: &str) {
    let devices = PodDevices::decode(ann::NVIDIA_DEVICES_ALLOCATED, allocated).expect("valid");
    s.add_pod(
        key,
        hami_sched::PodRecord::new(node.to_string(), devices, 0, false),
    );
}

/// Every card's usage and every node's totals, for before/after comparisons.
pub type State = Vec<(
    String,
    hami_sched::snapshot::NodeTotals,
    Vec<(String, hami_sched::Usage)>,
)>;

pub fn state(s: &Snapshot) -> State {
    s.nodes()
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                n.totals,
                n.devices
                    .iter()
                    .map(|d| (d.info.id.clone(), d.used))
                    .collect(),
            )
        })
        .collect()
}
