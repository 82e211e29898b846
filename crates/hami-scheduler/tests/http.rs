//! The HTTP surface without a cluster: routes, PascalCase extender JSON,
//! body limits, malformed input, readiness and metrics.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

use hami_api::DeviceInfo;
use hami_api::annotations as ann;
use hami_api::device::encode_devices_json;
use hami_kube::cache::Synced;
use hami_kube::clock::SystemClock;
use hami_kube::events::EventWriter;
use hami_kube::leader::Leadership;
use hami_sched::Engine;
use hami_scheduler::app::{self, App};
use hami_scheduler::metrics::Metrics;
use hami_scheduler::state::Cluster;
use hami_scheduler::tls::Caller;

fn app() -> App {
    hami_kube::client::install_crypto_provider();
    // Nothing listens there: handlers under test must not need the API.
    let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let engine = Arc::new(Engine::default());
    let mut cluster = Cluster::default();
    let now = jiff::Timestamp::now();
    for name in ["n1", "n2"] {
        let devices: Vec<DeviceInfo> = (0..2)
            .map(|i| DeviceInfo {
                id: format!("GPU-{name}-{i}"),
                index: i,
                count: 10,
                devmem: if name == "n1" { 4000 } else { 16000 },
                devcore: 100,
                device_type: "NVIDIA-T4".into(),
                health: true,
                ..Default::default()
            })
            .collect();
        let node = serde_json::from_value(json!({"metadata": {"name": name, "annotations": {
            ann::NODE_NVIDIA_REGISTER: encode_devices_json(&devices),
            ann::NODE_HANDSHAKE: "Reported now",
        }}}))
        .unwrap();
        cluster.upsert_node(&engine, node, now);
    }
    App {
        engine,
        cluster: Arc::new(Mutex::new(cluster)),
        client: client.clone(),
        events: EventWriter::new(client, "hami-scheduler", "test"),
        clock: Arc::new(SystemClock),
        leadership: Leadership::always(),
        synced: Synced::default(),
        metrics: Metrics::default(),
        lock_policy: Default::default(),
        lock_busy_after: jiff::SignedDuration::from_secs(5),
        scheduler_name: "hami-scheduler".into(),
        node_gates: Default::default(),
        bind_slots: Arc::new(tokio::sync::Semaphore::new(8)),
        failed: Default::default(),
        bind_flights: Default::default(),
        requeue: Default::default(),
        usage: Default::default(),
        usage_max_age: jiff::SignedDuration::from_secs(30),
    }
}

/// kube-scheduler beside us: loopback, no certificate.
fn kube_scheduler() -> Caller {
    Caller {
        peer: "127.0.0.1:40000".parse().unwrap(),
        client_certificate: false,
    }
}

async fn call(app: &App, method: &str, path: &str, body: Vec<u8>) -> (StatusCode, String) {
    call_from(app, Some(kube_scheduler()), method, path, body).await
}

/// A request as the TLS server hands it to the router: with the caller
/// it saw on the connection.
async fn call_from(
    app: &App,
    caller: Option<Caller>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, String) {
    let router = app::router(app.clone(), 64 * 1024);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    if let Some(c) = caller {
        req.extensions_mut().insert(c);
    }
    let resp = router.oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn args(limits: Value) -> Vec<u8> {
    args_of("hami-scheduler", limits)
}

fn args_of(scheduler_name: &str, limits: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "Pod": {
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
            "spec": {"schedulerName": scheduler_name,
                "containers": [{"name": "c", "resources": {"limits": limits}}]},
        },
        "NodeNames": ["n1", "n2", "n3"],
    }))
    .unwrap()
}

#[tokio::test]
async fn filter_answers_one_node_and_reasons_in_pascal_case() {
    let app = app();
    app.synced.set();
    let (status, body) = call(
        &app,
        "POST",
        "/filter",
        args(json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "8000"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["NodeNames"], json!(["n2"]), "{body}");
    assert_eq!(
        v["FailedNodes"]["n1"], "2/2 CardInsufficientMemory",
        "{body}"
    );
    assert_eq!(v["FailedNodes"]["n3"], "NodeInsufficientDevice", "{body}");
    assert_eq!(v["Error"], "");
    // Reserved at once: the same request for another pod now sees less.
    let held = app.cluster().snapshot().node("n2").unwrap().totals.used_mem;
    assert_eq!(held, 8000);
}

#[tokio::test]
async fn pods_without_managed_resources_keep_every_node() {
    let app = app();
    app.synced.set();
    let (status, body) = call(&app, "POST", "/filter", args(json!({"cpu": "2"}))).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["NodeNames"], json!(["n1", "n2", "n3"]), "{body}");
    assert_eq!(v["FailedNodes"], json!({}));
}

#[tokio::test]
async fn filter_refuses_before_the_caches_synced() {
    let app = app();
    let (_, body) = call(
        &app,
        "POST",
        "/filter",
        args(json!({"nvidia.com/gpu": "1"})),
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["Error"].as_str().unwrap().contains("not synced"),
        "{body}"
    );
    let (status, _) = call(&app, "GET", "/readyz", Vec::new()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    app.synced.set();
    let (status, body) = call(&app, "GET", "/readyz", Vec::new()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    let (status, _) = call(&app, "GET", "/healthz", Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn malformed_and_oversized_bodies_are_rejected_with_a_reason() {
    let app = app();
    app.synced.set();
    for path in ["/filter", "/bind", "/webhook"] {
        let (status, body) = call(&app, "POST", path, b"{not json".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert!(body.starts_with("malformed"), "{path}: {body}");
    }
    let (status, body) = call(&app, "POST", "/filter", br#"{"NodeNames": 7}"#.to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("NodeNames"), "{body}");
    let (status, body) = call(&app, "POST", "/bind", br#"{"PodName": "p"}"#.to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("PodNamespace"), "{body}");
    let (status, body) = call(
        &app,
        "POST",
        "/webhook",
        br#"{"apiVersion": "v9"}"#.to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("v9"), "{body}");
    let huge = vec![b' '; 65 * 1024];
    let (status, _) = call(&app, "POST", "/filter", huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn webhook_answers_v1beta1_reviews() {
    let app = app();
    let review = json!({
        "apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
        "request": {"uid": "r1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "object": {"metadata": {"name": "p"}, "spec": {"containers": [
                {"name": "c", "resources": {"limits": {"nvidia.com/gpucores": "30"}}}]}}},
    });
    let (status, body) = call(
        &app,
        "POST",
        "/webhook",
        serde_json::to_vec(&review).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1beta1");
    assert_eq!(v["response"]["uid"], "r1");
    assert_eq!(v["response"]["patchType"], "JSONPatch");
}

#[tokio::test]
async fn metrics_use_hami_names_and_labels() {
    let app = app();
    app.synced.set();
    call(
        &app,
        "POST",
        "/filter",
        args(json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000", "nvidia.com/gpucores": "25"})),
    )
    .await;
    let (status, text) = call(&app, "GET", "/metrics", Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    for name in [
        "hami_gpu_memory_limit_bytes",
        "hami_gpu_core_limit_ratio",
        "hami_gpu_memory_allocated_bytes",
        "hami_gpu_shared_count",
        "hami_gpu_core_allocated_ratio",
        "hami_node_gpu_overview",
        "hami_node_gpu_memory_allocated_ratio",
        "hami_vgpu_memory_allocated_bytes",
        "hami_vgpu_core_allocated_ratio",
        "hami_build_info",
        "hami_scheduler_filter_duration_seconds_bucket",
        "hami_scheduler_bind_duration_seconds_count",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("hami_vgpu_memory_allocated_bytes{"))
        .expect("one pod allocation");
    for label in [
        "namespace=\"ns\"",
        "pod=\"p\"",
        "container_index=\"0\"",
        "device_uuid=\"GPU-n",
    ] {
        assert!(line.contains(label), "{line}");
    }
    assert!(line.ends_with(" 1048576000.0"), "{line}");
    let line = text
        .lines()
        .find(|l| l.starts_with("hami_gpu_memory_limit_bytes{") && l.contains("GPU-n1-0"))
        .unwrap();
    for label in [
        "node=\"n1\"",
        "device_index=\"0\"",
        "device_type=\"NVIDIA-T4\"",
    ] {
        assert!(line.contains(label), "{line}");
    }
}

#[tokio::test]
async fn extender_verbs_answer_only_loopback_or_certified_callers() {
    let app = app();
    app.synced.set();
    let stranger = Caller {
        peer: "10.244.3.7:51000".parse().unwrap(),
        client_certificate: false,
    };
    let gpu = || args(json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"}));
    let bind = serde_json::to_vec(&json!({
        "PodName": "p", "PodNamespace": "ns", "PodUID": "u1", "Node": "n1"}))
    .unwrap();
    for (path, body) in [("/filter", gpu()), ("/bind", bind.clone())] {
        let (status, text) = call_from(&app, Some(stranger), "POST", path, body.clone()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {text}");
        assert!(text.contains("10.244.3.7"), "{text}");
        // A request that did not come through the TLS server at all.
        let (status, _) = call_from(&app, None, "POST", path, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
    }
    // Refused before the body is read: a huge body gets 403, not 413.
    let huge = vec![b' '; 65 * 1024];
    let (status, _) = call_from(&app, Some(stranger), "POST", "/filter", huge).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // IPv4 loopback seen through a dual-stack listener is loopback.
    let mapped = Caller {
        peer: "[::ffff:127.0.0.1]:40000".parse().unwrap(),
        client_certificate: false,
    };
    let (status, text) = call_from(&app, Some(mapped), "POST", "/filter", gpu()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    app.cluster().release("ns/p");
    // Nothing was reserved by the refused Filter.
    assert_eq!(app.cluster().snapshot().pods().count(), 0);
    // The same stranger with a verified client certificate is served.
    let certified = Caller {
        client_certificate: true,
        ..stranger
    };
    let (status, text) = call_from(&app, Some(certified), "POST", "/filter", gpu()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    // The webhook and observability stay open to the pod network.
    let (status, _) = call_from(&app, Some(stranger), "GET", "/metrics", Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call_from(&app, Some(stranger), "GET", "/readyz", Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn pods_of_another_scheduler_are_never_reserved() {
    let app = app();
    app.synced.set();
    for name in ["nobody", "default-scheduler"] {
        let (status, body) = call(
            &app,
            "POST",
            "/filter",
            args_of(
                name,
                json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "1000"}),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["NodeNames"], json!([]), "{body}");
        let why = v["FailedAndUnresolvableNodes"]["n2"]
            .as_str()
            .unwrap_or_default();
        assert!(why.contains(name), "{body}");
    }
    assert_eq!(app.cluster().snapshot().pods().count(), 0);
    assert!(app.cluster().reservation("ns/p").is_none());
}

#[tokio::test]
async fn binds_beyond_the_limit_are_refused_at_once() {
    let mut app = app();
    app.synced.set();
    app.bind_slots = Arc::new(tokio::sync::Semaphore::new(0));
    let bind = serde_json::to_vec(&json!({
        "PodName": "p", "PodNamespace": "ns", "PodUID": "u1", "Node": "n1"}))
    .unwrap();
    let (status, body) = call(&app, "POST", "/bind", bind).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["Error"].as_str().unwrap().contains("too many binds"),
        "{body}"
    );
    // Per-node gates live only while a bind holds or waits for them.
    let g1 = app.node_gates.gate("invented-1");
    let g2 = app.node_gates.gate("invented-1");
    let _g3 = app.node_gates.gate("invented-2");
    assert_eq!(app.node_gates.len(), 2);
    drop(g1);
    assert_eq!(app.node_gates.len(), 2);
    drop(g2);
    assert_eq!(app.node_gates.len(), 1);
}

#[tokio::test]
async fn a_dead_background_task_makes_the_scheduler_unready() {
    let app = app();
    app.synced.set();
    app.failed.set("pod watch stopped".into());
    let (status, body) = call(&app, "GET", "/readyz", Vec::new()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("pod watch stopped"), "{body}");
}
