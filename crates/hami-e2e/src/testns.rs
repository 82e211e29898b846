//! One test's corner of the shared cluster: a namespace and GPU nodes that
//! only its pods can land on, both deleted when the guard drops (also when
//! the test panics).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};

use hami_api::DeviceInfo;
use hami_api::annotations as ann;
use hami_api::device::encode_devices_json;

use crate::Cluster;

/// Label that ties a test's pods to its nodes.
pub const TEST_LABEL: &str = "hami-e2e/test";

/// A fake node with NVIDIA GPUs.
#[derive(Debug, Clone)]
pub struct GpuNode {
    /// Suffix; the node is named `<namespace>-<name>`.
    pub name: String,
    pub gpus: u32,
    pub mem_mib: u64,
    pub model: String,
    pub split: u32,
    /// NUMA node of each GPU (default all 0).
    pub numa: Vec<i32>,
    /// `hami.io/node-handshake`; default `Reported <now>`.
    pub handshake: Option<String>,
    /// Allocatable `nvidia.com/gpu`; default gpus x split.
    pub allocatable: Option<u64>,
    /// Whether kwok runs the node (and starts its pods); a node without
    /// kwok has no kubelet, so its pods stay Pending after binding.
    pub kwok: bool,
    /// `hami.io/node-allocation-mode`, as the node agent announces it
    /// (none: HAMi's node lock).
    pub allocation_mode: Option<String>,
    /// More node annotations (another vendor's register, say).
    pub annotations: Vec<(String, String)>,
    /// More capacity (and allocatable), e.g. another vendor's resources.
    pub resources: Vec<(String, String)>,
}

impl GpuNode {
    pub fn new(name: &str, gpus: u32, mem_mib: u64, model: &str) -> GpuNode {
        GpuNode {
            name: name.to_string(),
            gpus,
            mem_mib,
            model: model.to_string(),
            split: 10,
            numa: Vec::new(),
            annotations: Vec::new(),
            resources: Vec::new(),
            handshake: None,
            allocatable: None,
            kwok: true,
            allocation_mode: None,
        }
    }

    /// A node without NVIDIA cards, for other vendors' registrations.
    pub fn other_vendor(name: &str) -> GpuNode {
        GpuNode::new(name, 0, 0, "")
    }

    /// Adds a node annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> GpuNode {
        self.annotations.push((key.into(), value.into()));
        self
    }

    /// Adds a resource to the node's capacity and allocatable.
    pub fn resource(mut self, key: &str, value: &str) -> GpuNode {
        self.resources.push((key.into(), value.into()));
        self
    }

    /// UUID of GPU `i` on a node named `node`.
    pub fn uuid(node: &str, i: u32) -> String {
        format!("GPU-{node}-{i}")
    }

    fn object(&self, node_name: &str, test: &str) -> Value {
        let devices: Vec<DeviceInfo> = (0..self.gpus)
            .map(|i| DeviceInfo {
                id: GpuNode::uuid(node_name, i),
                index: i,
                count: self.split,
                devmem: self.mem_mib,
                devcore: 100,
                device_type: self.model.clone(),
                numa: self.numa.get(i as usize).copied().unwrap_or(0),
                health: true,
                ..Default::default()
            })
            .collect();
        let handshake = self.handshake.clone().unwrap_or_else(|| {
            format!(
                "Reported {}",
                jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M:%S")
            )
        });
        let gpus = self
            .allocatable
            .unwrap_or(u64::from(self.gpus) * u64::from(self.split))
            .to_string();
        let mut resources = json!({
            "cpu": "128", "memory": "1Ti", "pods": "500",
        });
        let mut annotations = json!({
            "kwok.x-k8s.io/node": if self.kwok { "fake" } else { "none" },
        });
        if self.gpus > 0 {
            resources["nvidia.com/gpu"] = json!(gpus);
            annotations[ann::NODE_NVIDIA_REGISTER] = json!(encode_devices_json(&devices));
            annotations[ann::NODE_HANDSHAKE] = json!(handshake);
        }
        for (k, v) in &self.annotations {
            annotations[k] = json!(v);
        }
        for (k, v) in &self.resources {
            resources[k] = json!(v);
        }
        if let Some(mode) = &self.allocation_mode {
            annotations[ann::NODE_ALLOCATION_MODE] = json!(mode);
        }
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {
                "name": node_name,
                "labels": {TEST_LABEL: test, "type": "kwok", "kubernetes.io/hostname": node_name},
                "annotations": annotations,
            },
            "status": {"allocatable": resources, "capacity": resources},
        })
    }
}

/// A test's namespace and nodes.
pub struct TestNs {
    pub name: String,
    pub client: kube::Client,
    nodes: Vec<String>,
    kubeconfig: std::path::PathBuf,
}

impl Cluster {
    /// Creates a namespace `<hint>-<n>` for one test.
    pub async fn namespace(&self, hint: &str) -> TestNs {
        let client = self.client().await;
        let name = format!(
            "{hint}-{}",
            jiff::Timestamp::now().as_millisecond() % 1_000_000
        );
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name},
        }))
        .expect("a namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("creating the test namespace");
        TestNs {
            name,
            client,
            nodes: Vec::new(),
            kubeconfig: self.kubeconfig.clone(),
        }
    }
}

impl TestNs {
    /// Node name for a suffix.
    pub fn node_name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.name)
    }

    /// Creates a fake GPU node that only this test's pods can use.
    pub async fn add_node(&mut self, spec: &GpuNode) -> String {
        let name = self.node_name(&spec.name);
        let node: Node =
            serde_json::from_value(spec.object(&name, &self.name)).expect("a node object");
        Api::<Node>::all(self.client.clone())
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("creating node {name}: {e}"));
        self.nodes.push(name.clone());
        name
    }

    /// A pod spec with GPU limits; `extra` is merged into the pod JSON.
    pub fn gpu_pod(&self, name: &str, limits: Value, annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.name, "annotations": annotations},
            "spec": {
                "nodeSelector": {TEST_LABEL: self.name},
                "tolerations": [{"operator": "Exists"}],
                "containers": [{
                    "name": "main", "image": "fake",
                    "resources": {"limits": limits},
                }],
            },
        })
    }

    /// Creates a pod from JSON (the webhook sees it like any other).
    pub async fn create_pod(&self, pod: Value) -> Result<Pod, kube::Error> {
        let pod: Pod = serde_json::from_value(pod).expect("a pod object");
        Api::<Pod>::namespaced(self.client.clone(), &self.name)
            .create(&PostParams::default(), &pod)
            .await
    }

    /// Deletes the pod at once (grace period 0).
    pub async fn delete_pod(&self, name: &str) {
        let now = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        Api::<Pod>::namespaced(self.client.clone(), &self.name)
            .delete(name, &now)
            .await
            .unwrap_or_else(|e| panic!("delete pod {name}: {e}"));
    }

    pub async fn get_pod(&self, name: &str) -> Pod {
        Api::<Pod>::namespaced(self.client.clone(), &self.name)
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("get pod {name}: {e}"))
    }

    pub async fn pods(&self) -> Vec<Pod> {
        Api::<Pod>::namespaced(self.client.clone(), &self.name)
            .list(&ListParams::default())
            .await
            .expect("listing pods")
            .items
    }

    /// Waits until the pod is bound; returns it.
    pub async fn wait_bound(&self, name: &str, timeout: Duration) -> Pod {
        let api = Api::<Pod>::namespaced(self.client.clone(), &self.name);
        wait_for(timeout, &format!("pod {name} bound"), || async {
            let p = api.get(name).await.ok()?;
            p.spec.as_ref()?.node_name.as_ref()?;
            Some(p)
        })
        .await
    }

    /// Events about one object of this namespace.
    pub async fn events_for(&self, name: &str) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), &self.name)
            .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
            .await
            .expect("listing events")
            .items
    }

    /// Waits for an event with `reason` about the object `name`.
    pub async fn wait_event(&self, name: &str, reason: &str, timeout: Duration) -> Event {
        wait_for(timeout, &format!("a {reason} event for {name}"), || async {
            self.events_for(name)
                .await
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(reason))
        })
        .await
    }

    /// The node's lock annotation (`hami.io/mutex.lock`), if set.
    pub async fn node_lock(&self, node: &str) -> Option<String> {
        self.node_annotation(node, ann::NODE_LOCK).await
    }

    /// The node's annotation `key`, if set.
    pub async fn node_annotation(&self, node: &str, key: &str) -> Option<String> {
        Api::<Node>::all(self.client.clone())
            .get(node)
            .await
            .unwrap_or_else(|e| panic!("get node {node}: {e}"))
            .metadata
            .annotations
            .and_then(|a| a.get(key).cloned())
    }

    /// Sets (`Some`) or removes (`None`) the node's annotation `key`, as a
    /// node agent or device plugin would.
    pub async fn set_node_annotation(&self, node: &str, key: &str, value: Option<&str>) {
        let patch = serde_json::json!({"metadata": {"annotations": {key: value}}});
        Api::<Node>::all(self.client.clone())
            .patch(
                node,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .unwrap_or_else(|e| panic!("annotate node {node}: {e}"));
    }

    /// The pod's annotation, if set.
    pub fn annotation(pod: &Pod, key: &str) -> Option<String> {
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a: &BTreeMap<String, String>| a.get(key))
            .cloned()
    }

    /// The node the pod is bound to ("" when none).
    pub fn node_of(pod: &Pod) -> String {
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default()
    }

    /// The first container's limit of `resource`, as written.
    pub fn limit(pod: &Pod, resource: &str) -> Option<String> {
        pod.spec.as_ref()?.containers[0]
            .resources
            .as_ref()?
            .limits
            .as_ref()?
            .get(resource)
            .map(|q| q.0.clone())
    }

    /// The pod's `vgpu-devices-allocated`, decoded (panics if malformed).
    pub fn allocation(pod: &Pod) -> hami_api::allocation::PodDevices {
        let v = TestNs::annotation(pod, ann::NVIDIA_DEVICES_ALLOCATED).unwrap_or_default();
        hami_api::allocation::PodDevices::decode(ann::NVIDIA_DEVICES_ALLOCATED, &v)
            .expect("a valid allocation annotation")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let name = self.name.clone();
        let nodes = std::mem::take(&mut self.nodes);
        let kubeconfig = self.kubeconfig.clone();
        // Drop cannot await; clean up on a thread with its own runtime.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let kc = kube::config::Kubeconfig::read_from(&kubeconfig).ok()?;
                let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .ok()?;
                let client = kube::Client::try_from(config).ok()?;
                let now = DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                };
                let pods: Api<Pod> = Api::namespaced(client.clone(), &name);
                let _ = pods.delete_collection(&now, &ListParams::default()).await;
                let node_api: Api<Node> = Api::all(client.clone());
                for n in nodes {
                    let _ = node_api.delete(&n, &now).await;
                }
                let _ = Api::<Namespace>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await;
                Some(())
            })
        });
        let _ = cleanup.join();
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or panics naming
/// `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
