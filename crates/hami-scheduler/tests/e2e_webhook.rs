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
    assert_eq!(TestNs::limit(&pod, "nvidia.com/gpu").as_deref(), Some("1"));
    assert_eq!(TestNs::limit(&pod, "nvidia.com/gpucores"), None);
    assert_eq!(env_value(&pod, "CUDA_TASK_PRIORITY").as_deref(), Some("0"));

    // Exclusive default: a whole GPU with no memory named gets gpucores 100.
    let pod = ns
        .create_pod(ns.gpu_pod("whole", json!({"nvidia.com/gpu": "1"}), json!({})))
        .await
        .expect("created");
    assert_eq!(
        TestNs::limit(&pod, "nvidia.com/gpucores").as_deref(),
        Some("100")
    );

    // Percentage 100 is exclusive too.
    let pod = ns
        .create_pod(ns.gpu_pod(
            "pct100",
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem-percentage": "100"}),
            json!({}),
        ))
        .await
        .expect("created");
    assert_eq!(
        TestNs::limit(&pod, "nvidia.com/gpucores").as_deref(),
        Some("100")
    );

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
    assert_eq!(TestNs::limit(&pod, "nvidia.com/gpu"), None);

    // Labelled hami.io/webhook=ignore: untouched (objectSelector).
    let mut ignored = ns.gpu_pod("ignored", json!({"nvidia.com/gpumem": "1000"}), json!({}));
    ignored["metadata"]["labels"] = json!({"hami.io/webhook": "ignore"});
    let pod = ns.create_pod(ignored).await.expect("created");
    assert_eq!(TestNs::limit(&pod, "nvidia.com/gpu"), None);

    // A pod without GPUs: untouched, default scheduler kept.
    let plain = ns.gpu_pod("plain", json!({"cpu": "1"}), json!({}));
    let pod = ns.create_pod(plain).await.expect("created");
    assert_eq!(
        pod.spec.as_ref().unwrap().scheduler_name.as_deref(),
        Some("default-scheduler")
    );
    let _ = TestNs::annotation(&pod, "x");
}

/// The shipped ValidatingAdmissionPolicy (deploy/), bound to one namespace
/// so that the other tests' admin-made pods are not judged by it.
async fn apply_annotation_policy(ns: &TestNs) {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/allocation-annotations-policy.yaml"
    ))
    .expect("deploy/allocation-annotations-policy.yaml");
    let mut docs = text.split("\n---\n");
    let policy: ValidatingAdmissionPolicy =
        serde_saphyr::from_str(docs.next().unwrap()).expect("the policy parses");
    let mut binding: ValidatingAdmissionPolicyBinding =
        serde_saphyr::from_str(docs.next().unwrap()).expect("the binding parses");
    let spec = binding.spec.as_mut().unwrap();
    spec.match_resources = Some(
        serde_json::from_value(json!({"namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": ns.name}}}))
        .unwrap(),
    );
    let pp = kube::api::PostParams::default();
    kube::Api::<ValidatingAdmissionPolicy>::all(ns.client.clone())
        .create(&pp, &policy)
        .await
        .expect("policy created");
    kube::Api::<ValidatingAdmissionPolicyBinding>::all(ns.client.clone())
        .create(&pp, &binding)
        .await
        .expect("binding created");
}

/// Lets `users` create, read and patch pods in the namespace.
async fn grant_pod_writes(ns: &TestNs, users: &[&str]) {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let pp = kube::api::PostParams::default();
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "pod-writer"},
        "rules": [{"apiGroups": [""], "resources": ["pods", "pods/status"],
            "verbs": ["create", "get", "patch", "update"]}],
    }))
    .unwrap();
    kube::Api::<Role>::namespaced(ns.client.clone(), &ns.name)
        .create(&pp, &role)
        .await
        .expect("role");
    let subjects: Vec<_> = users
        .iter()
        .map(|u| json!({"kind": "User", "name": u, "apiGroup": "rbac.authorization.k8s.io"}))
        .collect();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "pod-writer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-writer"},
        "subjects": subjects,
    }))
    .unwrap();
    kube::Api::<RoleBinding>::namespaced(ns.client.clone(), &ns.name)
        .create(&pp, &binding)
        .await
        .expect("role binding");
}

fn forged(ns: &TestNs, name: &str) -> serde_json::Value {
    let mut pod = ns.gpu_pod(
        name,
        json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"}),
        json!({
            "hami.io/vgpu-node": "some-node",
            "hami.io/vgpu-devices-allocated": "GPU-stolen,NVIDIA,1000,0:;",
            "hami.io/bind-phase": "success",
        }),
    );
    // Not bound to this test's nodes: only admission is under test.
    pod["spec"]["schedulerName"] = json!("nobody");
    pod
}

#[tokio::test]
async fn only_hami_components_write_allocation_annotations() {
    let Some(cluster) = hami_e2e::cluster(env!("CARGO_BIN_EXE_hami-scheduler")) else {
        return;
    };
    let ns = cluster.namespace("vap").await;
    const TENANT: &str = "tenant-alice";
    const SCHEDULER: &str = "system:serviceaccount:kube-system:hami-scheduler";
    grant_pod_writes(&ns, &[TENANT, SCHEDULER]).await;
    apply_annotation_policy(&ns).await;
    let tenant = cluster.client_as(TENANT, &["system:authenticated"]).await;
    let scheduler = cluster
        .client_as(
            SCHEDULER,
            &["system:serviceaccounts", "system:authenticated"],
        )
        .await;
    let tenant_pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(tenant.clone(), &ns.name);
    let pp = kube::api::PostParams::default();

    // Through the webhook: the forged annotations are stripped on CREATE.
    let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(forged(&ns, "forger")).unwrap();
    let created = tenant_pods
        .create(&pp, &p)
        .await
        .expect("created, stripped");
    for key in [
        "hami.io/vgpu-node",
        "hami.io/vgpu-devices-allocated",
        "hami.io/bind-phase",
    ] {
        assert_eq!(TestNs::annotation(&created, key), None, "{key} kept");
    }

    // Skipping the webhook (its objectSelector) does not help: the policy
    // refuses the pod, naming the keys. The policy is picked up by the
    // API server asynchronously, so this is the event to wait for.
    let mut skip = forged(&ns, "skipper");
    skip["metadata"]["labels"] = json!({"hami.io/webhook": "ignore"});
    let skip: k8s_openapi::api::core::v1::Pod = serde_json::from_value(skip).unwrap();
    // Dry runs go through admission and leave nothing behind.
    let dry = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    let denied = hami_e2e::wait_for(
        std::time::Duration::from_secs(30),
        "the policy to deny a forged pod",
        || async {
            match tenant_pods.create(&dry, &skip).await {
                Err(kube::Error::Api(e)) => Some(e),
                Ok(_) => None,
                Err(e) => panic!("{e}"),
            }
        },
    )
    .await;
    assert!(
        denied.message.contains("hami.io/vgpu-node")
            && denied.message.contains("hami.io/bind-phase"),
        "{denied:?}"
    );

    // A tenant may not add one later either...
    let patch = |key: &str, value: &str| {
        kube::api::Patch::Merge(json!({"metadata": {"annotations": {key: value}}}))
    };
    let e = tenant_pods
        .patch(
            "forger",
            &Default::default(),
            &patch("hami.io/vgpu-devices-allocated", "GPU-x,NVIDIA,1,0:;"),
        )
        .await
        .expect_err("a tenant wrote an allocation");
    assert!(
        e.to_string().contains("hami.io/vgpu-devices-allocated"),
        "{e}"
    );
    // Nor through the status subresource, which may change metadata too.
    let e = tenant_pods
        .patch_status(
            "forger",
            &Default::default(),
            &patch("hami.io/bind-phase", "success"),
        )
        .await
        .expect_err("a tenant wrote bind-phase through pods/status");
    assert!(e.to_string().contains("hami.io/bind-phase"), "{e}");
    // ...while its other annotations stay its own.
    tenant_pods
        .patch("forger", &Default::default(), &patch("team", "ml"))
        .await
        .expect("an unrelated annotation");
    // hami-scheduler may (it marks stuck binds failed).
    kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(scheduler, &ns.name)
        .patch(
            "forger",
            &Default::default(),
            &patch("hami.io/bind-phase", "failed"),
        )
        .await
        .expect("the scheduler's service account writes bind-phase");
}
