//! The scheduler's Prometheus exposition against HAMi's: every metric
//! HAMi's scheduler emits by default, with exactly its label names, and
//! HAMi's values (bytes, core percent, memory fractions) for one pod.

use std::collections::BTreeMap;

use serde_json::json;

use hami_api::DeviceInfo;
use hami_api::annotations as ann;
use hami_api::device::encode_devices_json;
use hami_sched::{Engine, Mode, Snapshot};
use hami_scheduler::metrics::Metrics;

const MIB: f64 = 1024.0 * 1024.0;

/// Whether HAMi emits samples of the metric for the snapshot of this test.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Emitted {
    /// Always (one series per GPU, per container device, or one in all).
    Always,
    /// Only for state this snapshot does not have: runtime-ready MIG
    /// instances, namespaces with a device ResourceQuota. When present,
    /// the labels must still be HAMi's.
    WhenApplicable,
}

/// HAMi's scheduler metrics with their label names, sorted, as emitted
/// with `--legacy-metrics=false` (the default). Transcribed from
/// Project-HAMi/HAMi cmd/scheduler/metrics.go (last changed in commit
/// b28d7d205d5447f4aaac1fc6f80e44ff62c28d89; read at HEAD
/// 4707fb02c91c545bc7343ce26dba4c32919f9a3e) and, for `hami_build_info`,
/// pkg/metrics/metrics.go. HAMi registers its scheduler collector through
/// `prometheus.WrapRegistererWith({zone: "vGPU"})`, so every metric but
/// `hami_build_info` also carries `zone`.
const HAMI: &[(&str, &[&str], Emitted)] = &[
    (
        "hami_gpu_memory_limit_bytes",
        &["device_index", "device_type", "device_uuid", "node", "zone"],
        Emitted::Always,
    ),
    (
        "hami_gpu_core_limit_ratio",
        &["device_index", "device_type", "device_uuid", "node", "zone"],
        Emitted::Always,
    ),
    (
        "hami_gpu_memory_allocated_bytes",
        &[
            "device_cores",
            "device_index",
            "device_type",
            "device_uuid",
            "node",
            "zone",
        ],
        Emitted::Always,
    ),
    (
        "hami_gpu_shared_count",
        &["device_index", "device_type", "device_uuid", "node", "zone"],
        Emitted::Always,
    ),
    (
        "hami_gpu_core_allocated_ratio",
        &["device_index", "device_type", "device_uuid", "node", "zone"],
        Emitted::Always,
    ),
    (
        "hami_node_gpu_overview",
        &[
            "device_cores",
            "device_index",
            "device_memory_limit",
            "device_type",
            "device_uuid",
            "node",
            "zone",
        ],
        Emitted::Always,
    ),
    (
        "hami_node_gpu_memory_allocated_ratio",
        &["device_index", "device_type", "device_uuid", "node", "zone"],
        Emitted::Always,
    ),
    (
        "hami_node_gpu_mig_instance_info",
        &[
            "compute_instance_id",
            "device_index",
            "device_uuid",
            "gpu_instance_id",
            "mig_uuid",
            "node",
            "placement_size",
            "placement_start",
            "profile",
            "zone",
        ],
        Emitted::WhenApplicable,
    ),
    (
        "hami_resource_quota_used",
        &["limit", "namespace", "quota_name", "zone"],
        Emitted::WhenApplicable,
    ),
    (
        "hami_resource_quota_limit",
        &["namespace", "quota_name", "zone"],
        Emitted::WhenApplicable,
    ),
    (
        "hami_vgpu_memory_allocated_bytes",
        &[
            "container_index",
            "device_uuid",
            "namespace",
            "node",
            "pod",
            "zone",
        ],
        Emitted::Always,
    ),
    (
        "hami_vgpu_core_allocated_ratio",
        &[
            "container_index",
            "device_uuid",
            "namespace",
            "node",
            "pod",
            "zone",
        ],
        Emitted::Always,
    ),
    (
        "hami_build_info",
        &[
            "build_date",
            "compiler",
            "go_version",
            "platform",
            "revision",
            "version",
        ],
        Emitted::Always,
    ),
];

/// Ours beyond HAMi's (histograms: their samples carry suffixes).
const EXTRAS: &[&str] = &[
    "hami_scheduler_filter_duration_seconds",
    "hami_scheduler_bind_duration_seconds",
];

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One sample line of the text format: `name{a="x",b="y"} value [ts]`.
fn parse_sample(line: &str) -> Sample {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("no value: {line}"));
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let end = loop {
            let Some(&(i, c)) = chars.peek() else {
                panic!("unterminated labels: {line}");
            };
            if c == '}' {
                break i;
            }
            if c == ',' {
                chars.next();
                continue;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => panic!("bad escape: {line}"),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => panic!("unterminated value: {line}"),
                }
            }
            assert!(
                labels.insert(key.clone(), value).is_none(),
                "label {key} twice: {line}"
            );
        };
        rest = &body[end + 1..];
    }
    let value = rest
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no value: {line}"));
    let value = value
        .parse()
        .unwrap_or_else(|e| panic!("value {value:?} of {line}: {e}"));
    Sample {
        name,
        labels,
        value,
    }
}

fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(parse_sample)
        .collect()
}

/// Node `n1`: two 16000 MiB, 100-core cards, ten slots each; pod `ns/p`
/// holds 4000 MiB and 30 % of one of them.
fn snapshot() -> (Snapshot, String) {
    let engine = Engine::default();
    let mut snapshot = Snapshot::new();
    let devices: Vec<DeviceInfo> = (0..2)
        .map(|i| DeviceInfo {
            id: format!("GPU-n1-{i}"),
            index: i,
            count: 10,
            devmem: 16000,
            devcore: 100,
            device_type: "NVIDIA-Tesla T4".into(),
            health: true,
            ..Default::default()
        })
        .collect();
    let node = serde_json::from_value(json!({"metadata": {"name": "n1", "annotations": {
        ann::NODE_NVIDIA_REGISTER: encode_devices_json(&devices),
        ann::NODE_HANDSHAKE: "Reported now",
    }}}))
    .unwrap();
    assert!(engine.add_node(&mut snapshot, &node).unwrap());
    let pod = serde_json::from_value(json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
        "spec": {"containers": [{"name": "c", "resources": {"limits": {
            "nvidia.com/gpu": "1", "nvidia.com/gpumem": "4000", "nvidia.com/gpucores": "30",
        }}}]},
    }))
    .unwrap();
    let req = engine.prepare(&pod).unwrap().expect("a GPU pod");
    let decision = engine.filter(&snapshot, &req, None, Mode::Explain);
    assert_eq!(decision.node, Some("n1"));
    let devices = decision.devices.clone();
    let uuid = devices.0[0][0].uuid.clone();
    engine.reserve(&mut snapshot, &req, "n1", devices);
    (snapshot, uuid)
}

#[test]
fn exposition_has_hami_names_labels_and_values() {
    let (snapshot, used) = snapshot();
    let text = Metrics::default().render(&snapshot);
    let samples = samples(&text);
    let table: BTreeMap<&str, (&[&str], Emitted)> =
        HAMI.iter().map(|&(n, l, e)| (n, (l, e))).collect();

    // Every HAMi metric: present where HAMi emits it, HAMi's labels exactly.
    // All differences at once, one line per metric.
    let mut wrong = Vec::new();
    for (&name, &(want, emitted)) in &table {
        let of: Vec<&Sample> = samples.iter().filter(|s| s.name == name).collect();
        if emitted == Emitted::Always && of.is_empty() {
            wrong.push(format!("{name}: missing"));
        }
        if let Some(s) = of.iter().find(|s| !s.labels.keys().eq(want.iter())) {
            let got: Vec<&str> = s.labels.keys().map(String::as_str).collect();
            wrong.push(format!("{name}: labels {got:?}, HAMi's {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "not HAMi's:\n{}", wrong.join("\n"));
    // Nothing else but our histograms.
    for s in &samples {
        let family = EXTRAS.iter().find(|x| {
            s.name
                .strip_prefix(**x)
                .is_some_and(|suffix| ["_bucket", "_sum", "_count"].contains(&suffix))
        });
        assert!(
            table.contains_key(s.name.as_str()) || family.is_some(),
            "{} is neither HAMi's nor one of our extras",
            s.name
        );
    }
    for x in EXTRAS {
        assert!(
            samples.iter().any(|s| s.name == format!("{x}_count")),
            "{x} missing"
        );
    }

    let one = |name: &str, uuid: &str| -> &Sample {
        let of: Vec<&Sample> = samples
            .iter()
            .filter(|s| {
                s.name == name && s.labels.get("device_uuid").map(String::as_str) == Some(uuid)
            })
            .collect();
        assert_eq!(of.len(), 1, "{name} of {uuid}: {of:?}");
        of[0]
    };
    let free = if used == "GPU-n1-0" {
        "GPU-n1-1"
    } else {
        "GPU-n1-0"
    };
    for (uuid, mem_mib, cores, shared) in
        [(used.as_str(), 4000.0, 30.0, 1.0), (free, 0.0, 0.0, 0.0)]
    {
        let s = one("hami_gpu_memory_limit_bytes", uuid);
        assert_eq!(s.value, 16000.0 * MIB, "{s:?}");
        assert_eq!(s.labels["node"], "n1");
        assert_eq!(s.labels["device_type"], "NVIDIA-Tesla T4");
        assert_eq!(s.labels["zone"], "vGPU");
        assert_eq!(s.labels["device_index"], &uuid["GPU-n1-".len()..]);
        // Core metrics count percent of a card, as HAMi's do.
        assert_eq!(one("hami_gpu_core_limit_ratio", uuid).value, 100.0);
        let s = one("hami_gpu_memory_allocated_bytes", uuid);
        assert_eq!(s.value, mem_mib * MIB, "{s:?}");
        assert_eq!(s.labels["device_cores"], "100");
        assert_eq!(one("hami_gpu_shared_count", uuid).value, shared);
        assert_eq!(one("hami_gpu_core_allocated_ratio", uuid).value, cores);
        let s = one("hami_node_gpu_overview", uuid);
        assert_eq!(s.value, mem_mib * MIB, "{s:?}");
        assert_eq!(s.labels["device_cores"], "100");
        assert_eq!(s.labels["device_memory_limit"], "16000");
        let s = one("hami_node_gpu_memory_allocated_ratio", uuid);
        assert_eq!(s.value, mem_mib / 16000.0, "{s:?}");
    }

    let s = one("hami_vgpu_memory_allocated_bytes", &used);
    assert_eq!(s.value, 4000.0 * MIB, "{s:?}");
    let want: BTreeMap<String, String> = [
        ("container_index", "0"),
        ("device_uuid", used.as_str()),
        ("namespace", "ns"),
        ("node", "n1"),
        ("pod", "p"),
        ("zone", "vGPU"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(s.labels, want);
    let s = one("hami_vgpu_core_allocated_ratio", &used);
    assert_eq!((s.value, &s.labels), (30.0, &want));
    assert!(
        !samples
            .iter()
            .any(|s| s.name.starts_with("hami_vgpu_") && s.labels["device_uuid"] == free),
        "the free card has no container series"
    );

    let build: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == "hami_build_info")
        .collect();
    assert_eq!(build.len(), 1);
    assert_eq!(build[0].value, 1.0);
    assert_eq!(build[0].labels["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(build[0].labels["compiler"], "rustc");
    for v in build[0].labels.values() {
        assert!(!v.is_empty(), "an empty label is no label: {:?}", build[0]);
    }
}

#[test]
fn parser_reads_escapes_and_bare_samples() {
    let s = parse_sample(r#"m{a="x\"y",b="\\"} 2.5"#);
    assert_eq!(s.name, "m");
    assert_eq!(s.labels["a"], "x\"y");
    assert_eq!(s.labels["b"], "\\");
    assert_eq!(s.value, 2.5);
    let s = parse_sample("m_count 3");
    assert!(s.labels.is_empty());
    assert_eq!(s.value, 3.0);
}
