//! The device plugin over the real gRPC protocol on unix sockets in a temp
//! dir. The test plays the kubelet's side (the test's kubelet-side peer):
//! it serves `Registration`, receives the plugin's registration, dials the
//! plugin's socket and calls it as the device manager would. Pods come
//! from an in-memory store; tests/e2e_allocate.rs does the same against a
//! real API server.

mod peer;
use peer::{serve_registration, within};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hami_api::DeviceInfo;
use hami_api::allocation::PodDevices;
use hami_api::annotations as ann;
use hami_node::allocate::Settings;
use hami_node::pending::{BoxFuture, PodStore, StoreError, has_devices_left, waits_on};
use hami_node::plugin::{self, Plugin};
use hami_node::proto;
use hami_node::proto::device_plugin_client::DevicePluginClient;
use hami_node::register::{register, unix_channel};
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tonic::Code;

const NODE: &str = "node-a";

/// What the in-memory store saw.
#[derive(Default)]
struct Seen {
    pod: Option<Pod>,
    lock_held: bool,
    failures: Vec<String>,
}

/// A pod store in memory, following the same rules as the API server one.
#[derive(Default, Clone)]
struct MemoryStore(Arc<Mutex<Seen>>);

impl MemoryStore {
    fn put(&self, pod: Pod) {
        let mut s = self.0.lock().unwrap();
        s.pod = Some(pod);
        s.lock_held = true;
    }

    fn annotation(&self, key: &str) -> Option<String> {
        let s = self.0.lock().unwrap();
        s.pod
            .as_ref()?
            .metadata
            .annotations
            .as_ref()?
            .get(key)
            .cloned()
    }

    fn set(&self, key: &str, value: String) {
        let mut s = self.0.lock().unwrap();
        if let Some(p) = s.pod.as_mut() {
            p.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(key.to_string(), value);
        }
    }
}

impl PodStore for MemoryStore {
    fn find_pending(&self) -> BoxFuture<'_, Result<Pod, StoreError>> {
        let found = self
            .0
            .lock()
            .unwrap()
            .pod
            .clone()
            .filter(|p| waits_on(p, NODE) && has_devices_left(p));
        Box::pin(async move {
            found.ok_or_else(|| StoreError::NoPendingPod {
                node: NODE.into(),
                detail: "the memory store holds none".into(),
            })
        })
    }

    fn finish<'a>(
        &'a self,
        _pod: &'a Pod,
        remaining: &'a PodDevices,
        done: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.set(ann::NVIDIA_DEVICES_TO_ALLOCATE, remaining.encode());
        if done {
            self.set(ann::BIND_PHASE, "success".into());
            self.0.lock().unwrap().lock_held = false;
        }
        Box::pin(async { Ok(()) })
    }

    fn fail<'a>(&'a self, _pod: &'a Pod, reason: &'a str) -> BoxFuture<'a, ()> {
        self.set(ann::BIND_PHASE, "failed".into());
        let mut s = self.0.lock().unwrap();
        s.lock_held = false;
        s.failures.push(reason.to_string());
        Box::pin(async {})
    }

    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Pod>, StoreError>> {
        let found = self.0.lock().unwrap().pod.clone().filter(|p| {
            p.metadata.namespace.as_deref() == Some(namespace)
                && p.metadata.name.as_deref() == Some(name)
        });
        Box::pin(async move { Ok(found) })
    }

    fn started<'a>(
        &'a self,
        _pod: &'a Pod,
        remaining: &'a PodDevices,
        done: bool,
        release_lock: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.set(ann::NVIDIA_DEVICES_TO_ALLOCATE, remaining.encode());
        if done {
            self.set(ann::BIND_PHASE, "success".into());
            if release_lock {
                self.0.lock().unwrap().lock_held = false;
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn warn<'a>(&'a self, _pod: &'a Pod, reason: &'a str) -> BoxFuture<'a, ()> {
        self.0.lock().unwrap().failures.push(reason.to_string());
        Box::pin(async {})
    }
}

fn card(id: &str, index: u32) -> DeviceInfo {
    DeviceInfo {
        id: id.into(),
        index,
        count: 3,
        devmem: 16384,
        devcore: 100,
        device_type: "NVIDIA-Tesla T4".into(),
        health: true,
        ..Default::default()
    }
}

fn bound_pod(to_allocate: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {
            "name": "train", "namespace": "team", "uid": "0b1c2d3e",
            "annotations": {
                ann::VGPU_NODE: NODE,
                ann::BIND_PHASE: "allocating",
                ann::BIND_TIME: "1700000000",
                ann::NVIDIA_DEVICES_TO_ALLOCATE: to_allocate,
                ann::NVIDIA_DEVICES_ALLOCATED: to_allocate,
            },
        },
        "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": "Pending"},
    }))
    .unwrap()
}

fn allocate_request(ids: &[&str]) -> proto::AllocateRequest {
    proto::AllocateRequest {
        container_requests: vec![proto::ContainerAllocateRequest {
            devices_ids: ids.iter().map(|s| s.to_string()).collect(),
        }],
    }
}

#[tokio::test]
async fn registers_lists_watches_health_and_allocates_over_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let hook = dir.path().join("hook");
    let lock_dir = dir.path().join("vgpulock");

    // The test's kubelet-side peer: a Registration server.
    let registration_socket = dir.path().join("kubelet.sock");
    let (reg_tx, mut reg_rx) = mpsc::unbounded_channel();
    let peer = serve_registration(&registration_socket, reg_tx);

    // The plugin: two cards split three ways.
    let (cards_tx, cards_rx) = watch::channel(vec![card("GPU-a", 0), card("GPU-b", 1)]);
    let store = MemoryStore::default();
    let mut settings = Settings::from_config(&hook, &hami_api::NvidiaConfig::default());
    settings.library = Settings::library_path(&hook, "0.1.0", false);
    let plugin = Plugin::new(cards_rx, Arc::new(store.clone()), settings)
        .with_lock_dir(Some(lock_dir.clone()));
    let options = plugin.options();
    let plugin_socket = dir.path().join("hami-test.sock");
    let listener = plugin::bind(&plugin_socket).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(plugin.serve(listener, async {
        let _ = stop_rx.await;
    }));

    within(
        "registration",
        register(
            &registration_socket,
            "hami-test.sock",
            "nvidia.com/gpu",
            options,
        ),
    )
    .await
    .expect("the plugin registers");
    let req = within("the registration request", reg_rx.recv())
        .await
        .unwrap();
    assert_eq!(req.version, "v1beta1");
    assert_eq!(req.resource_name, "nvidia.com/gpu");
    assert_eq!(req.endpoint, "hami-test.sock");
    assert_eq!(req.options, Some(options));

    // The peer dials the endpoint it was given, as the device manager does.
    let endpoint = registration_socket.parent().unwrap().join(&req.endpoint);
    let mut client = DevicePluginClient::new(
        within("dialing the plugin", unix_channel(&endpoint))
            .await
            .unwrap(),
    );

    let options = within(
        "GetDevicePluginOptions",
        client.get_device_plugin_options(proto::Empty {}),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(!options.pre_start_required);
    assert!(options.get_preferred_allocation_available);

    let mut stream = within("ListAndWatch", client.list_and_watch(proto::Empty {}))
        .await
        .unwrap()
        .into_inner();
    let first = within("the first device list", stream.message())
        .await
        .unwrap()
        .expect("a device list");
    let ids: Vec<&str> = first.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "GPU-a-0", "GPU-a-1", "GPU-a-2", "GPU-b-0", "GPU-b-1", "GPU-b-2"
        ]
    );
    assert!(first.devices.iter().all(|d| d.health == "Healthy"));

    // Card b turns unhealthy: the peer is told without asking.
    cards_tx.send_modify(|cards| cards[1].health = false);
    let second = within("the health update", stream.message())
        .await
        .unwrap()
        .expect("an updated device list");
    let health: Vec<(&str, &str)> = second
        .devices
        .iter()
        .map(|d| (d.id.as_str(), d.health.as_str()))
        .collect();
    assert_eq!(
        health,
        [
            ("GPU-a-0", "Healthy"),
            ("GPU-a-1", "Healthy"),
            ("GPU-a-2", "Healthy"),
            ("GPU-b-0", "Unhealthy"),
            ("GPU-b-1", "Unhealthy"),
            ("GPU-b-2", "Unhealthy"),
        ]
    );

    // No pod waiting: no preference (never an error, which would fail
    // the pod at the kubelet).
    let preferred_request = || proto::PreferredAllocationRequest {
        container_requests: vec![proto::ContainerPreferredAllocationRequest {
            available_device_i_ds: ["GPU-b-0", "GPU-a-2", "GPU-a-1"].map(String::from).to_vec(),
            must_include_device_i_ds: vec![],
            allocation_size: 1,
        }],
    };
    let none = within(
        "GetPreferredAllocation",
        client.get_preferred_allocation(preferred_request()),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(none.container_responses.is_empty());

    // Allocate with no pod waiting: an error that says why, nothing changed.
    let err = within("Allocate", client.allocate(allocate_request(&["GPU-a-0"])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("no pod waits for Allocate on node node-a"),
        "{}",
        err.message()
    );

    // A pod bound by the scheduler: 3000 MiB and 30 % of card a.
    store.put(bound_pod("GPU-a,NVIDIA,3000,30:;"));
    // The peer is steered to a free slot of the scheduler's card.
    let preferred = within(
        "GetPreferredAllocation",
        client.get_preferred_allocation(preferred_request()),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(preferred.container_responses.len(), 1);
    assert_eq!(preferred.container_responses[0].device_i_ds, ["GPU-a-2"]);
    let response = within("Allocate", client.allocate(allocate_request(&["GPU-a-2"])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.container_responses.len(), 1);
    let r = &response.container_responses[0];
    assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], "GPU-a");
    assert_eq!(r.envs["CUDA_DEVICE_MEMORY_LIMIT_0"], "3000m");
    assert_eq!(r.envs["CUDA_DEVICE_SM_LIMIT"], "30");
    let cache = &r.envs["CUDA_DEVICE_MEMORY_SHARED_CACHE"];
    let vgpu = hook.join("vgpu");
    assert!(
        cache.starts_with(&format!("{}/", vgpu.display())) && cache.ends_with(".cache"),
        "{cache}"
    );
    let host_dir = vgpu.join("containers/0b1c2d3e_main");
    let limits_dir = vgpu.join("limits/0b1c2d3e_main");
    assert_eq!(
        r.envs["HAMI_LIMITS_FILE"],
        vgpu.join("limits/hami-limits").display().to_string()
    );
    let mounts: Vec<(&str, &str, bool)> = r
        .mounts
        .iter()
        .map(|m| (m.container_path.as_str(), m.host_path.as_str(), m.read_only))
        .collect();
    let s = |p: &Path| p.display().to_string();
    assert_eq!(
        mounts,
        [
            (
                s(&vgpu.join("libvgpu.so")).as_str(),
                s(&vgpu.join("libvgpu.so")).as_str(),
                true
            ),
            (s(&vgpu).as_str(), s(&host_dir).as_str(), false),
            (
                s(&vgpu.join("limits")).as_str(),
                s(&limits_dir).as_str(),
                true
            ),
            (
                s(&vgpu.join("hami-limits")).as_str(),
                s(&limits_dir.join("hami-limits")).as_str(),
                true
            ),
            ("/tmp/vgpulock", "/tmp/vgpulock", false),
            (
                "/etc/ld.so.preload",
                s(&vgpu.join("ld.so.preload")).as_str(),
                true
            ),
        ]
    );
    // The host side: the per-container dir, and the limits file in its
    // own dir (not the read-write one), read-only.
    use std::os::unix::fs::PermissionsExt as _;
    assert!(host_dir.is_dir());
    assert!(!host_dir.join("hami-limits").exists());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&host_dir), 0o777);
    assert_eq!(mode(&limits_dir), 0o755);
    assert_eq!(mode(&limits_dir.join("hami-limits")), 0o444);
    let mut warnings = Vec::new();
    let limits = hami_shm::limits::read(&limits_dir.join("hami-limits"), &mut warnings)
        .unwrap()
        .expect("a limits file in the container's limits dir");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(limits.memory_limit(0), 3000 << 20);
    assert_eq!(limits.sm_limit(0), 30);
    assert!(lock_dir.is_dir());
    // The pod: nothing left to allocate, bind done, lock released.
    assert_eq!(
        store.annotation(ann::NVIDIA_DEVICES_TO_ALLOCATE).as_deref(),
        Some(";")
    );
    assert_eq!(
        store.annotation(ann::BIND_PHASE).as_deref(),
        Some("success")
    );
    assert!(!store.0.lock().unwrap().lock_held);

    // A pod whose annotation disagrees with the request: bind failed, lock
    // released, the reason in the gRPC error.
    store.put(bound_pod("GPU-a,NVIDIA,1000,10:GPU-b,NVIDIA,1000,10:;"));
    let err = within("Allocate", client.allocate(allocate_request(&["GPU-a-2"])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "pod team/train container main: hami.io/vgpu-devices-to-allocate gives 2 devices but the Allocate request asks for 1"
    );
    assert_eq!(store.annotation(ann::BIND_PHASE).as_deref(), Some("failed"));
    {
        let seen = store.0.lock().unwrap();
        assert!(!seen.lock_held);
        assert_eq!(seen.failures, [err.message().to_string()]);
    }

    // PreStartContainer answers (not required).
    within(
        "PreStartContainer",
        client.pre_start_container(proto::PreStartContainerRequest {
            devices_ids: vec!["GPU-a-0".into()],
        }),
    )
    .await
    .unwrap();

    // A clean stop once the peer hangs up.
    drop(stream);
    drop(client);
    let _ = stop_tx.send(());
    within("the plugin to stop", server).await.unwrap().unwrap();
    peer.abort();
}

/// The kubelet's PodResources service, played by the test over its real
/// gRPC protocol: answers List with what the test put in.
#[derive(Clone, Default)]
struct FakePodResources(Arc<Mutex<hami_node::proto_podresources::ListPodResourcesResponse>>);

impl FakePodResources {
    fn set(&self, entries: &[(&str, &str, &str, &[&str])]) {
        use hami_node::proto_podresources::{ContainerDevices, ContainerResources, PodResources};
        *self.0.lock().unwrap() = hami_node::proto_podresources::ListPodResourcesResponse {
            pod_resources: entries
                .iter()
                .map(|(ns, pod, c, ids)| PodResources {
                    name: pod.to_string(),
                    namespace: ns.to_string(),
                    containers: vec![ContainerResources {
                        name: c.to_string(),
                        devices: vec![ContainerDevices {
                            resource_name: "nvidia.com/gpu".into(),
                            device_ids: ids.iter().map(|s| s.to_string()).collect(),
                        }],
                    }],
                })
                .collect(),
        };
    }
}

#[tonic::async_trait]
impl hami_node::proto_podresources::pod_resources_lister_server::PodResourcesLister
    for FakePodResources
{
    async fn list(
        &self,
        _: tonic::Request<hami_node::proto_podresources::ListPodResourcesRequest>,
    ) -> Result<
        tonic::Response<hami_node::proto_podresources::ListPodResourcesResponse>,
        tonic::Status,
    > {
        Ok(tonic::Response::new(self.0.lock().unwrap().clone()))
    }

    async fn get(
        &self,
        _: tonic::Request<hami_node::proto_podresources::GetPodResourcesRequest>,
    ) -> Result<
        tonic::Response<hami_node::proto_podresources::GetPodResourcesResponse>,
        tonic::Status,
    > {
        Err(tonic::Status::unimplemented(
            "the kubelet's Get is behind a feature gate",
        ))
    }
}

/// Allocation without the node lock over the real protocols: Allocate
/// answers from the device IDs alone (no pod looked up), PreStartContainer
/// asks the PodResources service who received the IDs and writes that
/// container's limits where Allocate's mounts point; IDs nobody holds, or
/// a count that disagrees with the scheduler's, fail the start with the
/// pod named.
#[tokio::test]
async fn without_the_lock_prestart_writes_the_limits_of_the_container_the_kubelet_names() {
    use hami_node::lockfree::{AllocLinks, alloc_key};
    let dir = tempfile::tempdir().unwrap();
    let hook = dir.path().join("hook");

    let pr_socket = dir.path().join("pod-resources.sock");
    let fake = FakePodResources::default();
    let pr_server = {
        let listener = tokio::net::UnixListener::bind(&pr_socket).unwrap();
        let svc = hami_node::proto_podresources::pod_resources_lister_server::PodResourcesListerServer::new(fake.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        )
    };

    let (_cards_tx, cards_rx) = watch::channel(vec![card("GPU-a", 0), card("GPU-b", 1)]);
    let store = MemoryStore::default();
    let mut settings = Settings::from_config(&hook, &hami_api::NvidiaConfig::default());
    settings.library = Settings::library_path(&hook, "0.1.0", false);
    let plugin = Plugin::new(cards_rx, Arc::new(store.clone()), settings.clone())
        .with_lock_dir(None)
        .with_pod_resources(
            Arc::new(hami_node::pod_resources::PodResources::new(&pr_socket)),
            NODE,
            "nvidia.com/gpu",
            // A scheduler speaking HAMi's protocol locked the node for the pod.
            watch::channel(Some("2026-11-30T10:00:00Z,team,train".to_string())).1,
        );
    let options = plugin.options();
    assert!(options.pre_start_required);
    assert!(!options.get_preferred_allocation_available);
    let socket = dir.path().join("hami-test.sock");
    let listener = plugin::bind(&socket).unwrap();
    let server = tokio::spawn(plugin.serve(listener, std::future::pending()));
    let mut client = DevicePluginClient::new(unix_channel(&socket).await.unwrap());

    // Allocate: no pod in the store, and none needed.
    let ids = vec!["GPU-a-0".to_string()];
    let links = AllocLinks::new(&settings, &alloc_key(&ids));
    let r = within("Allocate", client.allocate(allocate_request(&["GPU-a-0"])))
        .await
        .unwrap()
        .into_inner();
    let mounts = &r.container_responses[0].mounts;
    assert!(
        mounts
            .iter()
            .any(|m| m.host_path == links.limits.display().to_string()
                && m.container_path.ends_with("/vgpu/limits")
                && m.read_only),
        "{mounts:?}"
    );
    assert!(store.0.lock().unwrap().failures.is_empty());

    // PreStartContainer: the kubelet says team/train main has GPU-a-0.
    store.put(bound_pod("GPU-a,NVIDIA,1000,10:;"));
    fake.set(&[("team", "train", "main", &["GPU-a-0"])]);
    within(
        "PreStartContainer",
        client.pre_start_container(proto::PreStartContainerRequest {
            devices_ids: ids.clone(),
        }),
    )
    .await
    .expect("the owner's limits are written");
    let limits = std::fs::read_to_string(links.limits.join("hami-limits")).unwrap();
    assert!(
        limits.contains("CUDA_DEVICE_MEMORY_LIMIT_0=1000m"),
        "{limits}"
    );
    assert_eq!(
        std::fs::read_link(&links.limits).unwrap(),
        settings.limits_dir("0b1c2d3e", "main")
    );
    assert_eq!(
        std::fs::read_to_string(links.limits.join("cards")).unwrap(),
        "GPU-a\n"
    );
    assert!(links.dir.is_dir());
    assert_eq!(
        store.annotation(ann::BIND_PHASE).as_deref(),
        Some("success")
    );
    assert_eq!(
        store.annotation(ann::NVIDIA_DEVICES_TO_ALLOCATE).as_deref(),
        Some(";")
    );
    assert!(
        !store.0.lock().unwrap().lock_held,
        "the lock taken for the pod is released"
    );

    // IDs nobody holds: the start fails, nothing is written.
    let err = within(
        "PreStartContainer",
        client.pre_start_container(proto::PreStartContainerRequest {
            devices_ids: vec!["GPU-b-0".into()],
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "no container holds devices [\"GPU-b-0\"] in the kubelet's PodResources"
    );

    // The kubelet gave two IDs where the scheduler gave one card.
    fake.set(&[("team", "train", "main", &["GPU-a-0", "GPU-a-1"])]);
    let err = within(
        "PreStartContainer",
        client.pre_start_container(proto::PreStartContainerRequest {
            devices_ids: vec!["GPU-a-0".into(), "GPU-a-1".into()],
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "pod team/train container main: hami.io/vgpu-devices-allocated gives 1 devices but the kubelet gave 2 ([\"GPU-a-0\", \"GPU-a-1\"])"
    );
    assert_eq!(
        store.0.lock().unwrap().failures,
        [err.message().to_string()]
    );

    // A new Allocate of the same IDs drops the previous owner's links.
    within("Allocate", client.allocate(allocate_request(&["GPU-a-0"])))
        .await
        .unwrap();
    assert!(std::fs::symlink_metadata(&links.limits).is_err());

    server.abort();
    pr_server.abort();
}
