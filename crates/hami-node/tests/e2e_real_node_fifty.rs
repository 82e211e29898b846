//! Allocation without the node lock through the kubelet's PodResources
//! (the default mode when the runtime serves no NRI socket) on the real node
//! (kubelet v1.34, containerd, runc), at once and in a mixed cluster: 50 GPU pods created
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

use real_node::{Setup, fifty_pods_at_once, phase, wait_finished, wait_node_serves};
use serde_json::json;

static SETUP: std::sync::OnceLock<Option<Setup>> = std::sync::OnceLock::new();

/// The real node with 25 slots per card, shared by this binary's tests.
fn setup() -> Option<&'static Setup> {
    SETUP
        // The default mode where the runtime serves no NRI socket (NRI
        // off in containerd): hami-node finds none and takes PodResources.
        .get_or_init(|| Setup::start_with(25, &["--nri-socket=/run/hami-e2e-nri-off.sock"]))
        .as_ref()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_pods_at_once_run_with_their_own_limits_and_the_node_is_never_locked() {
    let Some(s) = setup() else {
        return;
    };
    wait_node_serves(s).await;
    assert!(
        s.hami_node_log()
            .contains("allocation mode mode=\"pod-resources\""),
        "without an NRI socket the default is PodResources:\n{}",
        s.hami_node_log()
    );
    fifty_pods_at_once(s, "real-fifty").await;
    assert!(
        s.hami_node_log()
            .matches("limits written before the container starts")
            .count()
            >= 50,
        "every container went through PreStartContainer"
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
