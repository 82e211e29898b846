//! Drives the real `hami` binary: exit codes, the JSON contract of
//! `hami schedule`, error messages, `hami decode` and `hami simulate`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn hami(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hami"))
        .args(args)
        .output()
        .expect("hami runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `hami` whose stdout must be JSON alone: (exit code, the JSON).
fn hami_json(args: &[&str]) -> (i32, serde_json::Value) {
    let out = hami(args);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is JSON alone ({e}): {}{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    });
    (out.status.code().unwrap(), json)
}

/// `hami schedule -o json` over two files.
fn schedule_files(snapshot: &Path, pods: &Path, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args = vec![
        "schedule",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--pod",
        pods.to_str().unwrap(),
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    hami_json(&args)
}

fn schedule_json(extra: &[&str]) -> (i32, serde_json::Value) {
    schedule_files(&fixture("snapshot.yaml"), &fixture("pods.yaml"), extra)
}

#[test]
fn schedule_json_contract() {
    let (code, json) = schedule_json(&[]);
    assert_eq!(code, 1, "one pod does not fit: {json:#}");
    let pods = json.as_array().unwrap();
    assert_eq!(pods.len(), 3);

    // Binpack at node level: the A100 node already holds a job, so it is fuller.
    let infer = &pods[0];
    assert_eq!(infer["pod"], "default/infer");
    assert_eq!(infer["node"], "a100-node");
    // Spread at GPU level: the emptiest usable card; card 3 is cordoned, and
    // among equal scores the card registered last wins.
    assert_eq!(
        infer["devices"],
        serde_json::json!([[{"uuid": "GPU-a100-2", "type": "NVIDIA", "mem": 20000, "cores": 30}]])
    );
    assert_eq!(infer["annotations"]["hami.io/vgpu-node"], "a100-node");
    assert_eq!(
        infer["annotations"]["hami.io/vgpu-devices-allocated"],
        "GPU-a100-2,NVIDIA,20000,30:;"
    );
    assert_eq!(
        infer["annotations"]["hami.io/vgpu-devices-to-allocate"],
        infer["annotations"]["hami.io/vgpu-devices-allocated"]
    );
    assert!(
        infer["failed"]["t4-node"]
            .as_str()
            .unwrap()
            .contains("CardInsufficientMemory")
    );

    // Init container first, then the two app containers; the sidecar has none.
    let vision = &pods[1];
    assert_eq!(vision["node"], "t4-node");
    assert_eq!(vision["devices"].as_array().unwrap().len(), 3);
    assert_eq!(vision["devices"][0], serde_json::json!([]));
    assert_eq!(vision["devices"][2], serde_json::json!([]));
    assert_eq!(
        vision["annotations"]["hami.io/vgpu-devices-allocated"],
        ";GPU-t4-1,NVIDIA,3000,30:;;"
    );
    // Rules apply in HAMi's order: the cordoned card is counted as cordoned.
    assert_eq!(
        vision["failed"]["a100-node"],
        "3/4 CardTypeMismatch, 1/4 CardCordoned"
    );

    // Four whole cards; the A100 node has one cordoned card and two in use.
    let huge = &pods[2];
    assert!(huge["node"].is_null());
    assert_eq!(huge["devices"], serde_json::json!([]));
    let a100 = huge["failed"]["a100-node"].as_str().unwrap();
    assert!(a100.contains("1/4 CardCordoned"), "{a100}");
    // Whole cards (100 % memory once admitted): the two used cards lack memory.
    assert!(a100.contains("2/4 CardInsufficientMemory"), "{a100}");
    assert!(
        huge["failed"]["t4-node"]
            .as_str()
            .unwrap()
            .contains("AllocatedCardsInsufficientRequest")
    );
}

#[test]
fn admission_defaults_apply_unless_disabled() {
    let dir = tempdir();
    let pods = dir.join("pods.yaml");
    // Only gpumem: admission adds nvidia.com/gpu: 1 (defaultGPUNum).
    std::fs::write(
        &pods,
        "kind: Pod\nmetadata: {name: memonly}\nspec:\n  containers:\n  - name: c\n    resources:\n      limits: {nvidia.com/gpumem: 1000}\n",
    )
    .unwrap();
    let snapshot = fixture("snapshot.yaml");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "schedule",
            "--snapshot",
            snapshot.to_str().unwrap(),
            "--pod",
            pods.to_str().unwrap(),
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        let out = hami(&args);
        (
            out.status.code(),
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        )
    };
    let (code, json) = run(&[]);
    assert_eq!(code, Some(0), "{json:#}");
    assert_eq!(json[0]["devices"][0][0]["mem"], 1000);
    let (code, json) = run(&["--no-admission"]);
    assert_eq!(code, Some(1));
    assert!(
        json[0]["error"]
            .as_str()
            .unwrap()
            .contains("asks for no device"),
        "{json:#}"
    );
}

#[test]
fn schedule_table_explains_rejections() {
    let snapshot = fixture("snapshot.yaml");
    let pods = fixture("pods.yaml");
    let out = hami(&[
        "schedule",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--pod",
        pods.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("default/infer -> a100-node"), "{stdout}");
    assert!(stdout.contains("default/huge: not placed"), "{stdout}");
    assert!(stdout.contains("t4-node: "), "{stdout}");
    assert!(stdout.contains("2/3 pods placed"), "{stdout}");
    assert!(
        stdout.contains("CardCordoned: card is cordoned"),
        "legend explains reasons: {stdout}"
    );
}

#[test]
fn bad_input_exits_2_naming_file_document_and_field() {
    let dir = tempdir();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "kind: Pod\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {name: b}\nspec:\n  containers: yes\n").unwrap();
    let snapshot = fixture("snapshot.yaml");
    let out = hami(&[
        "schedule",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--pod",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.yaml: document 2: spec.containers:"),
        "{err}"
    );

    let cfg = dir.join("device-config.yaml");
    std::fs::write(&cfg, "nvidia:\n  deviceSplitCount: many\n").unwrap();
    let pods = fixture("pods.yaml");
    let out = hami(&[
        "schedule",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--pod",
        pods.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("device-config.yaml: nvidia.deviceSplitCount:"),
        "{}",
        text(&out.stderr)
    );

    let out = hami(&[
        "schedule",
        "--snapshot",
        "/nonexistent.yaml",
        "--pod",
        pods.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent.yaml: cannot read"));
}

#[test]
fn all_placed_exits_0_and_denials_are_reported() {
    let dir = tempdir();
    let pods = dir.join("pods.yaml");
    std::fs::write(
        &pods,
        "kind: Pod\nmetadata: {name: small}\nspec:\n  containers:\n  - name: c\n    resources:\n      limits: {nvidia.com/gpu: 1, nvidia.com/gpumem: 1000}\n",
    )
    .unwrap();
    let snapshot = fixture("snapshot.yaml");
    let out = hami(&[
        "schedule",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--pod",
        pods.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));

    std::fs::write(
        &pods,
        "kind: Pod\nmetadata: {name: greedy}\nspec:\n  containers:\n  - name: c\n    resources:\n      limits: {nvidia.com/gpu: 1, nvidia.com/gpumem-percentage: 140}\n",
    )
    .unwrap();
    let out = hami(&[
        "schedule",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--pod",
        pods.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = json[0]["error"].as_str().unwrap();
    assert!(
        err.contains("nvidia.com/gpumem-percentage=140: must be 0-100"),
        "{err}"
    );
}

#[test]
fn decode_explains_and_rejects() {
    let out = hami(&[
        "decode",
        "GPU-a,NVIDIA,3000,30:;GPU-b,NVIDIA,1000,0:GPU-c,NVIDIA,1000,0:;",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let s = text(&out.stdout);
    assert!(s.contains("2 container(s)"), "{s}");
    assert!(
        s.contains("container 1: GPU-c (NVIDIA): 1000 MiB, no compute limit"),
        "{s}"
    );
    let out = hami(&[
        "decode",
        "hami.io/node-handshake=Requesting_2024-05-06 07:08:09",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let out = hami(&[
        "decode",
        "--key",
        "hami.io/vgpu-devices-allocated",
        "GPU-a,NVIDIA,x,1:",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("hami.io/vgpu-devices-allocated"));
}

#[test]
fn simulate_is_deterministic_and_writes_a_report() {
    let dir = tempdir();
    let workload = dir.join("w.yaml");
    std::fs::write(
        &workload,
        "seed: 7\nhorizon: 6h\ngroups:\n- name: small\n  count: 300\n  arrival: {pattern: poisson}\n  duration: {min: 10m, max: 2h}\n  resources: {nvidia.com/gpu: 1, nvidia.com/gpumem: 20000, nvidia.com/gpucores: 20}\n- name: whole\n  count: 40\n  arrival: {pattern: uniform, end: 4h}\n  duration: 3h\n  resources: {nvidia.com/gpu: 2}\n",
    )
    .unwrap();
    let report = dir.join("r.html");
    let run = || {
        hami(&[
            "simulate",
            "--workload",
            workload.to_str().unwrap(),
            "--policy",
            "node=binpack,gpu=binpack",
            "--policy",
            "node=spread,gpu=spread",
            "--output",
            "json",
            "--report",
            report.to_str().unwrap(),
            "-q",
        ])
    };
    let a = run();
    assert_eq!(a.status.code(), Some(0), "{}", text(&a.stderr));
    let b = run();
    let ja: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    let jb: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
    assert_eq!(ja, jb, "same seed, same run");
    assert_eq!(ja.as_array().unwrap().len(), 2);
    assert_eq!(ja[0]["label"], "node=binpack,gpu=binpack");
    assert_eq!(ja[0]["pods"], 340);
    let placed = ja[0]["placed"].as_u64().unwrap();
    let never = ja[0]["never_placed"].as_u64().unwrap();
    assert_eq!(placed + never, 340);
    assert!(placed > 300, "{placed}");
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(
        html.contains("<svg") && html.contains("<polyline"),
        "charts are inline SVG"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "needs no network"
    );

    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "horizon: 1h\ngroups:\n- name: g\n  count: 1\n  arrival: {}\n  duration: 1 fortnight\n  resources: {nvidia.com/gpu: 1}\n").unwrap();
    let out = hami(&["simulate", "--workload", bad.to_str().unwrap(), "-q"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("bad.yaml: document 1: groups[0].duration"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn simulate_accepts_a_kubernetes_dump_as_the_cluster() {
    let dir = tempdir();
    let workload = dir.join("w.yaml");
    // The dump has 4 A100 cards (one cordoned, one 40 GB into a running job:
    // neither can be taken whole) and 2 T4s: of five whole-card pods arriving
    // at once, 4 are placed.
    std::fs::write(
        &workload,
        "horizon: 1h\ngroups:\n- name: whole\n  count: 5\n  arrival: {pattern: burst}\n  duration: 2h\n  resources: {nvidia.com/gpu: 1}\n",
    )
    .unwrap();
    let snapshot = fixture("snapshot.yaml");
    let out = hami(&[
        "simulate",
        "--cluster",
        snapshot.to_str().unwrap(),
        "--workload",
        workload.to_str().unwrap(),
        "-o",
        "json",
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["placed"], 4, "{json:#}");
    assert_eq!(json[0]["never_placed"], 1);
}

/// A fresh directory under the target dir (no extra crate needed).
fn tempdir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hami-cli-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Two empty-ish T4 nodes; `extra` is appended to the List's items.
fn two_node_snapshot(lock_on_n1: &str, extra: &str) -> String {
    let reg = |n: &str| {
        format!(
            "[{{\"id\":\"GPU-{n}\",\"count\":10,\"devmem\":15360,\"devcore\":100,\"type\":\"NVIDIA-Tesla T4\",\"health\":true}}]"
        )
    };
    format!(
        "kind: List\nitems:\n- kind: Node\n  metadata:\n    name: n1\n    annotations:\n      hami.io/node-nvidia-register: '{}'\n      hami.io/mutex.lock: '{lock_on_n1}'\n- kind: Node\n  metadata:\n    name: n2\n    annotations:\n      hami.io/node-nvidia-register: '{}'\n{extra}",
        reg("n1"),
        reg("n2")
    )
}

fn schedule_one(snapshot: &str, extra: &[&str]) -> serde_json::Value {
    schedule_one_pod(
        snapshot,
        "kind: Pod\nmetadata: {name: p, namespace: default}\nspec:\n  containers:\n  - name: c\n    resources:\n      limits: {nvidia.com/gpu: 1, nvidia.com/gpumem: 1000}\n",
        extra,
    )
}

fn schedule_one_pod(snapshot: &str, pod: &str, extra: &[&str]) -> serde_json::Value {
    let dir = tempdir();
    let (snap, pods) = (dir.join("snapshot.yaml"), dir.join("pods.yaml"));
    std::fs::write(&snap, snapshot).unwrap();
    std::fs::write(&pods, pod).unwrap();
    schedule_files(&snap, &pods, extra).1[0].clone()
}

/// A pod holding n1's bind lock, bound there, still waiting for its device
/// plugin: binpack would pick n1 (the fuller node), the extender passes it over.
const HOLDER_ON_N1: &str = "- kind: Pod\n  metadata:\n    name: holder\n    namespace: ml\n    annotations:\n      hami.io/vgpu-node: n1\n      hami.io/vgpu-devices-allocated: 'GPU-n1,NVIDIA,1000,0:;'\n      hami.io/bind-phase: allocating\n  spec:\n    nodeName: n1\n    containers:\n    - name: c\n  status:\n    phase: Pending\n";

#[test]
fn schedule_passes_over_a_node_whose_bind_lock_is_stuck() {
    let snap = two_node_snapshot("2026-01-01T00:09:00Z,ml,holder", HOLDER_ON_N1);
    let p = schedule_one(&snap, &["--now", "2026-01-01T00:10:00Z"]);
    assert_eq!(p["node"], "n2", "{p:#}");
    assert_eq!(
        p["failed"]["n1"],
        "NodeLockBusy: bind lock held by ml/holder since 2026-01-01T00:09:00Z (its device plugin has not allocated yet)"
    );
    // Three seconds after the lock was taken it is not stuck yet.
    let p = schedule_one(&snap, &["--now", "2026-01-01T00:09:03Z"]);
    assert_eq!(p["node"], "n1", "{p:#}");
    // Or with a longer threshold.
    let p = schedule_one(
        &snap,
        &["--now", "2026-01-01T00:10:00Z", "--lock-busy-after", "120"],
    );
    assert_eq!(p["node"], "n1", "{p:#}");
}

#[test]
fn schedule_counts_only_pods_bound_to_the_node_they_name() {
    // The lock is old and names a pod that is gone, so only holding counts.
    let forged = HOLDER_ON_N1.replace("    nodeName: n1\n", "");
    let snap = two_node_snapshot("2026-01-01T00:00:00Z,ml,gone", HOLDER_ON_N1);
    let whole = "kind: Pod\nmetadata: {name: whole}\nspec:\n  containers:\n  - name: c\n    resources:\n      limits: {nvidia.com/gpu: 1, nvidia.com/gpumem: 15000}\n";
    assert_eq!(schedule_one_pod(&snap, whole, &[])["node"], "n2");
    let forged = two_node_snapshot("2026-01-01T00:00:00Z,ml,gone", &forged);
    assert_eq!(
        schedule_one_pod(&forged, whole, &[])["node"],
        "n1",
        "forged annotations hold nothing"
    );
}

fn decode_json(args: &[&str]) -> (i32, serde_json::Value) {
    let mut all = vec!["decode", "--output", "json"];
    all.extend_from_slice(args);
    hami_json(&all)
}

#[test]
fn decode_json_contract() {
    // Register entries carry every field, also those the wire omits.
    let (code, json) = decode_json(&[
        "GPU-a,10,15360,100,NVIDIA-Tesla T4,0,true:GPU-b,10,15360,100,NVIDIA-Tesla T4,1,false,1,mig:",
    ]);
    assert_eq!(code, 0);
    assert_eq!(json["kind"], "register");
    assert_eq!(json["key"], "hami.io/node-nvidia-register");
    assert_eq!(
        json["devices"][0],
        serde_json::json!({"id": "GPU-a", "index": 0, "count": 10, "devmem": 15360,
            "devcore": 100, "type": "NVIDIA-Tesla T4", "numa": 0, "mode": "hami-core",
            "health": true, "migProfiles": null})
    );
    assert_eq!(json["devices"][1]["mode"], "mig");
    assert_eq!(json["devices"][1]["health"], false);
    assert_eq!(json["devices"][1]["numa"], 1);
    // Allocations: one list per container, init containers first.
    let (code, json) = decode_json(&[
        "hami.io/vgpu-devices-allocated=;GPU-a,NVIDIA,3000,30:GPU-b,NVIDIA,1000,0:;",
    ]);
    assert_eq!(code, 0);
    assert_eq!(
        json,
        serde_json::json!({"kind": "allocation", "key": "hami.io/vgpu-devices-allocated",
            "containers": [[], [
                {"uuid": "GPU-a", "type": "NVIDIA", "mem": 3000, "cores": 30},
                {"uuid": "GPU-b", "type": "NVIDIA", "mem": 1000, "cores": 0}]]})
    );
    let (_, json) = decode_json(&["2024-05-06T07:08:09Z,default,p"]);
    assert_eq!(
        json,
        serde_json::json!({"kind": "lock", "key": "hami.io/mutex.lock",
            "since": "2024-05-06T07:08:09Z", "namespace": "default", "pod": "p"})
    );
    let (_, json) = decode_json(&["--key", "hami.io/gpu-scheduler-policy", "binpack,numa"]);
    assert_eq!(
        (&json["policy"], &json["numa"]),
        (&serde_json::json!("binpack"), &serde_json::json!(true))
    );
    // What does not decode: {"error": ...} on stdout and exit code 2.
    let (code, json) = decode_json(&["hami.io/vgpu-devices-allocated=GPU-a,NVIDIA,lots,3:"]);
    assert_eq!(code, 2);
    let error = json["error"].as_str().unwrap();
    assert!(error.contains("memory \"lots\""), "{error}");
    assert_eq!(json.as_object().unwrap().len(), 1);
}

#[test]
fn a_closed_output_pipe_ends_hami_quietly() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_hami"))
        .args(["simulate"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line, as `hami simulate | head -1` would, then hang up.
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(!first.is_empty());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn simulate_runs_the_mixed_vendor_example() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let out = hami(&[
        "simulate",
        "--cluster",
        root.join("mixed-cluster.yaml").to_str().unwrap(),
        "--workload",
        root.join("mixed-workload.yaml").to_str().unwrap(),
        "-o",
        "json",
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let groups = json[0]["groups"].as_array().expect("per-group results");
    assert_eq!(groups.len(), 5, "{json:#}");
    for g in groups {
        // Every vendor's pods found their vendor's cards.
        assert!(g["placed"].as_u64().unwrap() > 0, "{g:#}");
    }
}
