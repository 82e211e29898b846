//! Allocation without the node lock on the real node (kubelet v1.34,
//! containerd, runc), at once and in a mixed cluster: 50 GPU pods created
//! together onto the real node all run with their own limits (each one
//! checked inside its container), while the node's lock annotation never
//! appears (a watch of the node sees every change); kwok nodes in HAMi's
//! lock mode in the same run still get the lock for their binds. And the
//! NRI plugin's protocol against the node's real containerd: registered,
//! it is called at each container's creation with the pod (its
//! annotations included) and its env adjustment reaches the container.
//! Its own test binary: the node here has 25 slots per card (100 in all).
//! Skips (printing why) where the real-node harness cannot run.

mod real_node;

use std::time::Duration;

use futures::StreamExt as _;
use hami_e2e::{GpuNode, LockWatch};
use real_node::{Setup, line, phase, probe_pod, wait_finished, wait_node_serves};
use serde_json::json;

const PODS: usize = 50;

static SETUP: std::sync::OnceLock<Option<Setup>> = std::sync::OnceLock::new();

/// The real node with 25 slots per card, shared by this binary's tests.
fn setup() -> Option<&'static Setup> {
    SETUP.get_or_init(|| Setup::start(25)).as_ref()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_pods_at_once_run_with_their_own_limits_and_the_node_is_never_locked() {
    let Some(s) = setup() else {
        return;
    };
    wait_node_serves(s).await;
    let mut ns = s.cluster.namespace("real-fifty").await;
    // A node in HAMi's lock mode (no allocation-mode annotation), run by kwok.
    let kwok = ns
        .add_node(&GpuNode::new("kwok-lock", 2, 16384, "NVIDIA-Tesla T4"))
        .await;
    let real_locks = LockWatch::start(ns.client.clone(), &s.node.name).await;
    let kwok_locks = LockWatch::start(ns.client.clone(), &kwok).await;

    // Each real pod its own memory limit, so a pod given another's limits
    // shows it.
    let mib = |i: usize| 200 + 8 * i as u64;
    let mut pods = Vec::new();
    for i in 0..PODS {
        let m = mib(i);
        pods.push(probe_pod(
            &ns,
            &format!("p{i:02}"),
            json!({"nvidia.com/gpu": 1, "nvidia.com/gpumem": m}),
            &[
                "/bin/cuda-probe",
                "init",
                "alloc",
                &format!("{}m", m - 1),
                "free",
                "0",
                "alloc",
                &format!("{}m", m + 1),
                "nvml-mem",
                "0",
            ],
        ));
    }
    for i in 0..4 {
        pods.push(ns.gpu_pod(
            &format!("kwok{i}"),
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"}),
            json!({}),
        ));
    }
    let created: Vec<_> = futures::stream::iter(pods)
        .map(|p| ns.create_pod(p))
        .buffer_unordered(16)
        .collect()
        .await;
    for c in created {
        c.expect("creating a pod");
    }

    for i in 0..PODS {
        let name = format!("p{i:02}");
        let (pod, log) = wait_finished(s, &ns, &name).await;
        let context = || format!("{name}: {log}\nhami-node:\n{}", s.hami_node_log());
        assert_eq!(phase(&pod), "Succeeded", "{}", context());
        // HAMi's node label, written by hami-node with its one patch.
        assert_eq!(
            pod.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("hami.io/vgpu-node"))
                .map(String::as_str),
            Some(s.node.name.as_str()),
            "{name}"
        );
        assert_eq!(
            line(&log, "alloc", 0)[1],
            "0",
            "under its limit: {}",
            context()
        );
        assert_eq!(
            line(&log, "alloc", 1)[1],
            "2",
            "1 MiB over its own {} MiB: {}",
            mib(i),
            context()
        );
        assert_eq!(
            line(&log, "nvml-mem", 0)[2],
            (mib(i) << 20).to_string(),
            "nvidia-smi's total is its own limit: {}",
            context()
        );
    }
    for i in 0..4 {
        let p = ns
            .wait_bound(&format!("kwok{i}"), Duration::from_secs(60))
            .await;
        assert_eq!(
            p.spec.and_then(|s| s.node_name).as_deref(),
            Some(kwok.as_str())
        );
    }
    let wait = Duration::from_secs(60);
    let (real_seen, kwok_seen) = (real_locks.stop(wait).await, kwok_locks.stop(wait).await);
    assert!(
        real_seen.is_empty(),
        "the lock-free real node was locked {} times, first {:?}",
        real_seen.len(),
        real_seen.first()
    );
    assert!(
        !kwok_seen.is_empty(),
        "the kwok node in lock mode never showed HAMi's lock"
    );
}

/// What containerd's NRI hands a plugin, recorded; containers of pods in
/// `namespace` get `HAMI_NRI_TEST=<pod uid>:<container>` added.
struct Tagger {
    namespace: String,
    seen: std::sync::Mutex<Vec<(String, String, Option<String>)>>,
}

impl hami_node::nri::Handler for Tagger {
    fn synchronize<'a>(
        &'a self,
        _: &'a [hami_node::proto_nri::PodSandbox],
        _: &'a [hami_node::proto_nri::Container],
    ) -> hami_node::pending::BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn create_container<'a>(
        &'a self,
        pod: &'a hami_node::proto_nri::PodSandbox,
        container: &'a hami_node::proto_nri::Container,
    ) -> hami_node::pending::BoxFuture<'a, Result<hami_node::proto_nri::ContainerAdjustment, String>>
    {
        let mut adjust = hami_node::proto_nri::ContainerAdjustment::default();
        if pod.namespace == self.namespace {
            self.seen.lock().unwrap().push((
                pod.name.clone(),
                container.name.clone(),
                pod.annotations.get("test.hami.io/marker").cloned(),
            ));
            adjust.env.push(hami_node::proto_nri::KeyValue {
                key: "HAMI_NRI_TEST".into(),
                value: format!("{}:{}", pod.uid, container.name),
            });
        }
        Box::pin(async move { Ok(adjust) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nri_protocol_works_with_the_nodes_containerd() {
    let Some(s) = setup() else {
        return;
    };
    wait_node_serves(s).await;
    let ns = s.cluster.namespace("real-nri").await;
    let tagger = std::sync::Arc::new(Tagger {
        namespace: ns.name.clone(),
        seen: Default::default(),
    });
    let (registered, is_registered) = tokio::sync::oneshot::channel();
    let plugin = {
        let socket = s.node.nri_socket.clone();
        let tagger = tagger.clone();
        tokio::spawn(async move {
            hami_node::nri::serve_once(
                &socket,
                &hami_node::nri::Identity {
                    name: "hami-e2e".into(),
                    index: "50".into(),
                },
                tagger,
                Some(registered),
            )
            .await
        })
    };
    tokio::time::timeout(Duration::from_secs(30), is_registered)
        .await
        .expect("containerd configured the plugin within 30 s")
        .expect("the plugin registered");

    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "tagged", "namespace": ns.name,
                     "annotations": {"test.hami.io/marker": "seen"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": hami_e2e::REAL_NODE},
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main", "image": hami_e2e::BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", "echo NRI=$HAMI_NRI_TEST"],
            }],
        },
    });
    pod["metadata"]["labels"] = json!({"hami.io/webhook": "ignore"});
    let created = ns.create_pod(pod).await.expect("creating the pod");
    let (done, log) = wait_finished(s, &ns, "tagged").await;
    assert_eq!(phase(&done), "Succeeded", "{log}");
    let uid = created.metadata.uid.unwrap_or_default();
    assert!(
        log.contains(&format!("NRI={uid}:main")),
        "the plugin's env reached the container: {log:?}"
    );
    assert_eq!(
        *tagger.seen.lock().unwrap(),
        vec![(
            "tagged".to_string(),
            "main".to_string(),
            Some("seen".to_string())
        )],
        "called once for the container, with the pod's annotations"
    );
    plugin.abort();
}
