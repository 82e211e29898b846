//! Against a real kube-apiserver: pods are mutated and denied by our
//! webhook exactly as spec section 5 says. Skips when the control-plane
//! binaries are not built (see hami-e2e).

use serde_json::json;

use hami_e2e::TestNs;

fn env_value(pod: &k8s_openapi::api::core::v1::Pod, var: &str) -> Option<String> {
    pod.spec.as_ref()?.containers[0]
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == var)?
        .value
        .clone()
}

fn limit(pod: &k8s_openapi::api::core::v1::Pod, resource: &str) -> Option<String> {
    pod.spec.as_ref()?.containers[0]
        .resources
        .as_ref()?
        .limits
        .as_ref()?
        .get(resource)
        .map(|q| q.0.clone())
}

#[tokio::test]
async fn gpu_pods_are_mutated_and_privileged_ones_denied() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let ns = cluster.namespace("webhook").await;

    // gpumem + priority only: gets nvidia.com/gpu 1, the priority env and our scheduler.
    let pod = ns
        .create_pod(ns.gpu_pod(
            "mem-only",
            json!({"nvidia.com/gpumem": "3000", "nvidia.com/priority": "0"}),
            json!({}),
        ))
        .await
        .expect("created");
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.scheduler_name.as_deref(), Some("hami-scheduler"));
    assert_eq!(limit(&pod, "nvidia.com/gpu").as_deref(), Some("1"));
    assert_eq!(limit(&pod, "nvidia.com/gpucores"), None);
    assert_eq!(env_value(&pod, "CUDA_TASK_PRIORITY").as_deref(), Some("0"));

    // Exclusive default: a whole GPU with no memory named gets gpucores 100.
    let pod = ns
        .create_pod(ns.gpu_pod("whole", json!({"nvidia.com/gpu": "1"}), json!({})))
        .await
        .expect("created");
    assert_eq!(limit(&pod, "nvidia.com/gpucores").as_deref(), Some("100"));

    // Percentage 100 is exclusive too.
    let pod = ns
        .create_pod(ns.gpu_pod(
            "pct100",
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem-percentage": "100"}),
            json!({}),
        ))
        .await
        .expect("created");
    assert_eq!(limit(&pod, "nvidia.com/gpucores").as_deref(), Some("100"));

    // Privileged with GPUs: denied, and the message names the rule.
    let mut privileged = ns.gpu_pod("priv", json!({"nvidia.com/gpu": "1"}), json!({}));
    privileged["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
    let err = ns.create_pod(privileged).await.expect_err("denied");
    let msg = err.to_string();
    assert!(
        msg.contains("privileged") && msg.contains("nvidia.com/gpu"),
        "{msg}"
    );

    // Percentage above 100: denied with resource, value and rule.
    let err = ns
        .create_pod(ns.gpu_pod(
            "pct140",
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem-percentage": "140"}),
            json!({}),
        ))
        .await
        .expect_err("denied");
    let msg = err.to_string();
    assert!(
        msg.contains("nvidia.com/gpumem-percentage") && msg.contains("140"),
        "{msg}"
    );

    // spec.nodeName with GPUs: denied.
    let mut pinned = ns.gpu_pod("pinned", json!({"nvidia.com/gpu": "1"}), json!({}));
    pinned["spec"]["nodeName"] = json!("somewhere");
    let err = ns.create_pod(pinned).await.expect_err("denied");
    assert!(err.to_string().contains("nodeName"), "{err}");

    // Another scheduler's pod: untouched.
    let mut other = ns.gpu_pod("other", json!({"nvidia.com/gpumem": "1000"}), json!({}));
    other["spec"]["schedulerName"] = json!("volcano");
    let pod = ns.create_pod(other).await.expect("created");
    assert_eq!(
        pod.spec.as_ref().unwrap().scheduler_name.as_deref(),
        Some("volcano")
    );
    assert_eq!(limit(&pod, "nvidia.com/gpu"), None);

    // Labelled hami.io/webhook=ignore: untouched (objectSelector).
    let mut ignored = ns.gpu_pod("ignored", json!({"nvidia.com/gpumem": "1000"}), json!({}));
    ignored["metadata"]["labels"] = json!({"hami.io/webhook": "ignore"});
    let pod = ns.create_pod(ignored).await.expect("created");
    assert_eq!(limit(&pod, "nvidia.com/gpu"), None);

    // A pod without GPUs: untouched, default scheduler kept.
    let plain = ns.gpu_pod("plain", json!({"cpu": "1"}), json!({}));
    let pod = ns.create_pod(plain).await.expect("created");
    assert_eq!(
        pod.spec.as_ref().unwrap().scheduler_name.as_deref(),
        Some("default-scheduler")
    );
    let _ = TestNs::annotation(&pod, "x");
}
