//! Allocate against a real API server (hami-e2e's control plane, without
//! hami-scheduler): the test binds a pod to a node with the annotations
//! exactly as hami-scheduler's bind writes them and takes the node lock
//! for it, then calls the plugin's Allocate over gRPC on a unix socket as
//! the test's kubelet-side peer.
//!
//! Skips when the control-plane binaries are missing, unless
//! HAMI_E2E_REQUIRE=1.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hami_api::DeviceInfo;
use hami_api::annotations as ann;
use hami_api::node::NodeLock;
use hami_e2e::{GpuNode, TestNs};
use hami_node::allocate::Settings;
use hami_node::pending::{ALLOCATE_FAILED, KubeStore};
use hami_node::plugin::{self, Plugin};
use hami_node::proto;
use hami_node::proto::device_plugin_client::DevicePluginClient;
use hami_node::register::unix_channel;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;

const SPLIT: u32 = 10;

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A node with two cards and no kubelet (kwok leaves it alone, so its
/// pods stay Pending, as on a real node before the device plugin's
/// Allocate). Returns its name and cards.
async fn gpu_node(ns: &mut TestNs) -> (String, Vec<DeviceInfo>) {
    let spec = GpuNode {
        kwok: false,
        split: SPLIT,
        ..GpuNode::new("gpu", 2, 16384, "NVIDIA-Tesla T4")
    };
    let name = ns.add_node(&spec).await;
    let cards = (0..2)
        .map(|i| DeviceInfo {
            id: GpuNode::uuid(&name, i),
            index: i,
            count: SPLIT,
            devmem: 16384,
            devcore: 100,
            device_type: "NVIDIA-Tesla T4".into(),
            health: true,
            ..Default::default()
        })
        .collect();
    (name, cards)
}

/// Takes the node lock for `pod`, as hami-scheduler's bind does.
async fn lock_node(ns: &TestNs, node: &str, pod: &str) -> String {
    let value = NodeLock {
        since: jiff::Timestamp::now(),
        namespace: ns.name.clone(),
        pod: pod.to_string(),
    }
    .encode();
    Api::<Node>::all(ns.client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {ann::NODE_LOCK: value}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("locking node {node}: {e}"));
    value
}

/// Creates a pod bound to `node` carrying what hami-scheduler's bind
/// writes (annotations, and the vgpu-node label).
async fn bound_pod(ns: &TestNs, name: &str, node: &str, devices: &str) -> Pod {
    bound_pod_with(ns, name, node, devices, &["main"]).await
}

async fn bound_pod_with(
    ns: &TestNs,
    name: &str,
    node: &str,
    devices: &str,
    containers: &[&str],
) -> Pod {
    let containers: Vec<_> = containers
        .iter()
        .map(|c| {
            json!({
                "name": c, "image": "fake",
                "resources": {"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "3000", "nvidia.com/gpucores": "30"}},
            })
        })
        .collect();
    let now = jiff::Timestamp::now().as_second().to_string();
    ns.create_pod(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns.name,
            "labels": {ann::VGPU_NODE: node},
            "annotations": {
                ann::VGPU_NODE: node,
                ann::VGPU_TIME: now,
                ann::NVIDIA_DEVICES_TO_ALLOCATE: devices,
                ann::NVIDIA_DEVICES_ALLOCATED: devices,
                ann::BIND_PHASE: "allocating",
                ann::BIND_TIME: now,
            },
        },
        "spec": {
            "nodeName": node,
            "tolerations": [{"operator": "Exists"}],
            "containers": containers,
        },
    }))
    .await
    .unwrap_or_else(|e| panic!("creating pod {name}: {e}"))
}

/// The plugin for `node`, on a socket in `dir`, with its pods on the API
/// server; returns the peer's client.
async fn start_plugin(
    ns: &TestNs,
    node: &str,
    cards: Vec<DeviceInfo>,
    dir: &std::path::Path,
) -> (DevicePluginClient<Channel>, watch::Sender<Vec<DeviceInfo>>) {
    let hook = dir.join("hook");
    let settings = Settings::from_config(&hook, &hami_api::NvidiaConfig::default());
    let store = KubeStore::new(ns.client.clone(), node, Arc::new(hami_kube::SystemClock));
    let (tx, rx) = watch::channel(cards);
    let plugin =
        Plugin::new(rx, Arc::new(store), settings).with_lock_dir(Some(dir.join("vgpulock")));
    let socket = dir.join("hami-node.sock");
    let listener = plugin::bind(&socket).unwrap();
    tokio::spawn(plugin.serve(listener, std::future::pending()));
    let channel = within("dialing the plugin", unix_channel(&socket))
        .await
        .unwrap();
    (DevicePluginClient::new(channel), tx)
}

fn request(ids: &[String]) -> proto::AllocateRequest {
    proto::AllocateRequest {
        container_requests: vec![proto::ContainerAllocateRequest {
            devices_ids: ids.to_vec(),
        }],
    }
}

fn annotations(p: &Pod) -> BTreeMap<String, String> {
    p.metadata.annotations.clone().unwrap_or_default()
}

#[tokio::test]
async fn allocate_serves_the_bound_pod_then_refuses_when_none_waits() {
    let Some(cluster) = hami_e2e::control_plane() else {
        return;
    };
    let mut ns = cluster.namespace("node-alloc").await;
    let (node, cards) = gpu_node(&mut ns).await;
    let card = cards[1].id.clone();
    let devices = format!("{card},NVIDIA,3000,30:;");
    let pod = bound_pod(&ns, "train", &node, &devices).await;
    let lock = lock_node(&ns, &node, "train").await;
    let dir = tempfile::tempdir().unwrap();
    let (mut client, _cards) = start_plugin(&ns, &node, cards, dir.path()).await;

    let response = within("Allocate", client.allocate(request(&[format!("{card}-4")])))
        .await
        .unwrap_or_else(|s| panic!("Allocate failed: {s:?}"))
        .into_inner();
    let r = &response.container_responses[0];
    assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], card);
    assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "3000m");
    assert_eq!(r.envs["CUDA_DEVICE_SM_LIMIT"], "30");
    let uid = pod.metadata.uid.clone().unwrap();
    let host_dir = dir.path().join(format!("hook/vgpu/containers/{uid}_main"));
    assert_eq!(r.mounts[1].host_path, host_dir.display().to_string());
    let limits_dir = dir.path().join(format!("hook/vgpu/limits/{uid}_main"));
    assert_eq!(r.mounts[2].host_path, limits_dir.display().to_string());
    assert!(r.mounts[2].read_only);
    assert!(limits_dir.join("hami-limits").is_file());
    assert!(!host_dir.join("hami-limits").exists());

    let after = ns.get_pod("train").await;
    let a = annotations(&after);
    assert_eq!(a[ann::NVIDIA_DEVICES_TO_ALLOCATE], ";");
    assert_eq!(a[ann::BIND_PHASE], "success");
    assert_eq!(a[ann::NVIDIA_DEVICES_ALLOCATED], devices, "allocated stays");
    assert_eq!(ns.node_lock(&node).await, None, "lock {lock} released");

    // Nothing waits any more: an error that says why, and nothing changes.
    let err = within("Allocate", client.allocate(request(&[format!("{card}-5")])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains(&format!("no pod waits for Allocate on node {node}")),
        "{}",
        err.message()
    );
    let unchanged = ns.get_pod("train").await;
    assert_eq!(
        unchanged.metadata.resource_version, after.metadata.resource_version,
        "the pod was not written"
    );
    assert_eq!(ns.node_lock(&node).await, None);
    assert!(
        ns.events_for("train")
            .await
            .iter()
            .all(|e| e.reason.as_deref() != Some(ALLOCATE_FAILED))
    );
}

#[tokio::test]
async fn a_failed_allocate_marks_the_pod_failed_releases_the_lock_and_says_why() {
    let Some(cluster) = hami_e2e::control_plane() else {
        return;
    };
    let mut ns = cluster.namespace("node-fail").await;
    let (node, cards) = gpu_node(&mut ns).await;
    // The annotation names a card this node does not have.
    bound_pod(&ns, "stray", &node, "GPU-elsewhere,NVIDIA,1000,10:;").await;
    lock_node(&ns, &node, "stray").await;
    let dir = tempfile::tempdir().unwrap();
    let id = format!("{}-0", cards[0].id);
    let (mut client, _cards) = start_plugin(&ns, &node, cards, dir.path()).await;

    let err = within("Allocate", client.allocate(request(&[id])))
        .await
        .unwrap_err();
    let why = format!(
        "pod {}/stray container main: hami.io/vgpu-devices-to-allocate names card GPU-elsewhere, which this node does not have",
        ns.name
    );
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), why);
    let a = annotations(&ns.get_pod("stray").await);
    assert_eq!(a[ann::BIND_PHASE], "failed");
    assert_eq!(
        a[ann::NVIDIA_DEVICES_TO_ALLOCATE],
        "GPU-elsewhere,NVIDIA,1000,10:;",
        "nothing was allocated"
    );
    assert_eq!(ns.node_lock(&node).await, None, "lock released");
    let event = ns
        .wait_event("stray", ALLOCATE_FAILED, Duration::from_secs(30))
        .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.message.as_deref(), Some(why.as_str()));
}

#[tokio::test]
async fn a_two_container_pod_keeps_the_lock_until_its_last_container() {
    let Some(cluster) = hami_e2e::control_plane() else {
        return;
    };
    let mut ns = cluster.namespace("node-two").await;
    let (node, cards) = gpu_node(&mut ns).await;
    let (a, b) = (cards[0].id.clone(), cards[1].id.clone());
    let devices = format!("{a},NVIDIA,1000,10:;{b},NVIDIA,2000,20:;");
    let pod = bound_pod_with(&ns, "pair", &node, &devices, &["first", "second"]).await;
    let lock = lock_node(&ns, &node, "pair").await;
    let dir = tempfile::tempdir().unwrap();
    let (mut client, _cards) = start_plugin(&ns, &node, cards, dir.path()).await;

    // The first container: its card, the lock still held, still allocating.
    let r = within("Allocate", client.allocate(request(&[format!("{a}-0")])))
        .await
        .unwrap_or_else(|s| panic!("Allocate failed: {s:?}"))
        .into_inner();
    assert_eq!(r.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"], a);
    assert_eq!(
        r.container_responses[0].envs["CUDA_DEVICE_MEMORY_LIMIT_0"],
        "1000m"
    );
    let mid = annotations(&ns.get_pod("pair").await);
    assert_eq!(
        mid[ann::NVIDIA_DEVICES_TO_ALLOCATE],
        format!(";{b},NVIDIA,2000,20:;")
    );
    assert_eq!(mid[ann::BIND_PHASE], "allocating");
    assert_eq!(ns.node_lock(&node).await.as_deref(), Some(lock.as_str()));

    // The second: done, lock released.
    let r = within("Allocate", client.allocate(request(&[format!("{b}-0")])))
        .await
        .unwrap_or_else(|s| panic!("Allocate failed: {s:?}"))
        .into_inner();
    assert_eq!(r.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"], b);
    assert_eq!(r.container_responses[0].envs["CUDA_DEVICE_SM_LIMIT"], "20");
    let uid = pod.metadata.uid.unwrap();
    assert_eq!(
        r.container_responses[0].mounts[1].host_path,
        dir.path()
            .join(format!("hook/vgpu/containers/{uid}_second"))
            .display()
            .to_string()
    );
    let end = annotations(&ns.get_pod("pair").await);
    assert_eq!(end[ann::NVIDIA_DEVICES_TO_ALLOCATE], ";;");
    assert_eq!(end[ann::BIND_PHASE], "success");
    assert_eq!(ns.node_lock(&node).await, None);
}
