//! `hami decode`: explain any HAMi annotation value in words.

use clap::{Args, ValueEnum};

use hami_api::DecodeError;
use hami_api::allocation::PodDevices;
use hami_api::annotations as ann;
use hami_api::device::{DeviceInfo, decode_devices};
use hami_api::node::{Handshake, NodeLock, decode_cordon};
use hami_api::policy::{GpuPolicySpec, NodePolicy, ScoringWeights};
use hami_api::topology::{DevicePairScore, decode_pair_scores};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct DecodeArgs {
    /// The value, or `KEY=VALUE` with the annotation key (then the key decides the format).
    pub value: String,
    /// The annotation key, when the value alone is ambiguous.
    #[arg(long)]
    pub key: Option<String>,
    /// `text` for people, `json` for programs (a stable interface, see docs/cli.md).
    #[arg(long, short, value_enum, default_value = "text")]
    pub output: Output,
}

/// Exit code 0 and the explanation, or 2 and why it is not a HAMi value.
/// With `--output json` stdout holds one JSON object either way.
pub fn execute(args: DecodeArgs) -> i32 {
    let (key, value) = match (&args.key, args.value.split_once('=')) {
        (Some(k), _) => (Some(k.as_str()), args.value.as_str()),
        (None, Some((k, v))) if known_key(k) => (Some(k), v),
        _ => (None, args.value.as_str()),
    };
    let decoded = decode(key, value);
    match (args.output, decoded) {
        (Output::Text, Ok(d)) => {
            print!("{}", d.text());
            0
        }
        (Output::Text, Err(e)) => {
            eprintln!("error: {e}");
            2
        }
        (Output::Json, Ok(d)) => {
            println!("{}", d.json());
            0
        }
        (Output::Json, Err(e)) => {
            println!("{}", serde_json::json!({ "error": e }));
            2
        }
    }
}

fn known_key(k: &str) -> bool {
    k.starts_with("hami.io/") || k.starts_with("nvidia.com/")
}

/// A decoded annotation value.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Register(Vec<DeviceInfo>),
    Allocation(PodDevices),
    Handshake(Handshake),
    PairScores(Vec<DevicePairScore>),
    Cordon(Vec<String>),
    Lock(NodeLock),
    Weights(ScoringWeights),
    GpuPolicy(GpuPolicySpec),
    NodePolicy(NodePolicy),
}

/// Decodes a value; with a key, in that key's format, else the format is guessed.
pub fn decode(key: Option<&str>, value: &str) -> Result<Decoded, String> {
    let v = value.trim();
    Ok(match key {
        Some(ann::NODE_NVIDIA_REGISTER) => {
            Decoded::Register(decode_devices(ann::NODE_NVIDIA_REGISTER, v).map_err(s)?)
        }
        Some(k @ (ann::NVIDIA_DEVICES_ALLOCATED | ann::NVIDIA_DEVICES_TO_ALLOCATE)) => {
            Decoded::Allocation(PodDevices::decode(k, v).map_err(s)?)
        }
        Some(ann::NODE_HANDSHAKE) => {
            Decoded::Handshake(Handshake::decode(ann::NODE_HANDSHAKE, v).map_err(s)?)
        }
        Some(ann::NODE_NVIDIA_SCORE) => {
            Decoded::PairScores(decode_pair_scores(ann::NODE_NVIDIA_SCORE, v).map_err(s)?)
        }
        Some(ann::DEVICE_CORDON) => Decoded::Cordon(decode_cordon(v)),
        Some(ann::NODE_LOCK) => Decoded::Lock(NodeLock::decode(v).map_err(s)?),
        Some(ann::DEVICE_SCORING_WEIGHTS) => {
            Decoded::Weights(ScoringWeights::decode(ann::DEVICE_SCORING_WEIGHTS, v).map_err(s)?)
        }
        Some(ann::GPU_SCHEDULER_POLICY) => {
            Decoded::GpuPolicy(GpuPolicySpec::decode(ann::GPU_SCHEDULER_POLICY, v).map_err(s)?)
        }
        Some(ann::NODE_SCHEDULER_POLICY) => Decoded::NodePolicy(
            v.parse()
                .map_err(|e| format!("{}: {e}", ann::NODE_SCHEDULER_POLICY))?,
        ),
        Some(other) => {
            return Err(format!(
                "{other}: no decoder for this key (see docs/annotations.md)"
            ));
        }
        None => guess(v)?,
    })
}

fn s(e: DecodeError) -> String {
    e.to_string()
}

fn guess(v: &str) -> Result<Decoded, String> {
    if v.starts_with('[') {
        if v.contains("\"uuid\"") {
            return decode(Some(ann::NODE_NVIDIA_SCORE), v);
        }
        return decode(Some(ann::NODE_NVIDIA_REGISTER), v);
    }
    if v.starts_with("Requesting_") || v.starts_with("Reported") || v.starts_with("Deleted") {
        return decode(Some(ann::NODE_HANDSHAKE), v);
    }
    if let Ok(l) = NodeLock::decode(v) {
        return Ok(Decoded::Lock(l));
    }
    if v.contains("slot=") || v.contains("core=") || v.contains("memory=") {
        return decode(Some(ann::DEVICE_SCORING_WEIGHTS), v);
    }
    if let Ok(p) = GpuPolicySpec::decode(ann::GPU_SCHEDULER_POLICY, v) {
        return Ok(Decoded::GpuPolicy(p));
    }
    // Allocation entries have 4 fields per device, register entries 7 to 9.
    let first = v
        .split([':', ';'])
        .find(|e| !e.is_empty())
        .unwrap_or_default();
    match first.split(',').count() {
        4 => decode(Some(ann::NVIDIA_DEVICES_ALLOCATED), v),
        7..=9 => decode(Some(ann::NODE_NVIDIA_REGISTER), v),
        _ if !v.is_empty()
            && v.split(',')
                .all(|u| u.trim().starts_with("GPU-") || u.trim().is_empty()) =>
        {
            Ok(Decoded::Cordon(decode_cordon(v)))
        }
        _ => Err(format!(
            "{v:?} is not a HAMi annotation value I know; pass --key to name the annotation"
        )),
    }
}

impl Decoded {
    /// The explanation for people.
    pub fn text(&self) -> String {
        match self {
            Decoded::Register(list) => devices(list),
            Decoded::Allocation(pd) => allocation(pd),
            Decoded::Handshake(h) => handshake(h),
            Decoded::PairScores(scores) => pair_scores(scores),
            Decoded::Cordon(list) => cordon(list),
            Decoded::Lock(l) => lock(l),
            Decoded::Weights(w) => weights(w),
            Decoded::GpuPolicy(p) => gpu_policy(p),
            Decoded::NodePolicy(p) => format!("node policy {p}: {}\n", node_policy_words(*p)),
        }
    }

    /// The value for programs: `kind`, the annotation `key` and the fields
    /// of that kind (docs/cli.md lists them). Every field is present.
    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Decoded::Register(list) => json!({
                "kind": "register",
                "key": ann::NODE_NVIDIA_REGISTER,
                "devices": list.iter().map(|d| json!({
                    "id": d.id,
                    "index": d.index,
                    "count": d.count,
                    "devmem": d.devmem,
                    "devcore": d.devcore,
                    "type": d.device_type,
                    "numa": d.numa,
                    "mode": d.mode().as_str(),
                    "health": d.health,
                    "migProfiles": d.mig_profiles.as_deref(),
                })).collect::<Vec<_>>(),
            }),
            Decoded::Allocation(pd) => json!({
                "kind": "allocation",
                "key": ann::NVIDIA_DEVICES_ALLOCATED,
                "containers": pd.0,
            }),
            Decoded::Handshake(h) => {
                let (state, time, detail) = match h {
                    Handshake::Requesting(t) => ("requesting", Some(t.to_string()), None),
                    Handshake::Reported(v) => ("reported", None, Some(v)),
                    Handshake::Deleted(v) => ("deleted", None, Some(v)),
                };
                json!({
                    "kind": "handshake",
                    "key": ann::NODE_HANDSHAKE,
                    "state": state,
                    "time": time,
                    "detail": detail,
                })
            }
            Decoded::PairScores(scores) => json!({
                "kind": "topology",
                "key": ann::NODE_NVIDIA_SCORE,
                "scores": scores,
            }),
            Decoded::Cordon(list) => json!({
                "kind": "cordon",
                "key": ann::DEVICE_CORDON,
                "uuids": list,
            }),
            Decoded::Lock(l) => json!({
                "kind": "lock",
                "key": ann::NODE_LOCK,
                "since": l.since.to_string(),
                "namespace": l.namespace,
                "pod": l.pod,
            }),
            Decoded::Weights(w) => json!({
                "kind": "weights",
                "key": ann::DEVICE_SCORING_WEIGHTS,
                "slot": w.slot,
                "core": w.core,
                "memory": w.memory,
            }),
            Decoded::GpuPolicy(p) => json!({
                "kind": "gpu-policy",
                "key": ann::GPU_SCHEDULER_POLICY,
                "policy": p.policy.map(|p| p.as_str()),
                "numa": p.numa,
            }),
            Decoded::NodePolicy(p) => json!({
                "kind": "node-policy",
                "key": ann::NODE_SCHEDULER_POLICY,
                "policy": p.as_str(),
            }),
        }
    }
}

fn devices(list: &[DeviceInfo]) -> String {
    let mut out = format!(
        "node device registration ({}): {} card(s)\n",
        ann::NODE_NVIDIA_REGISTER,
        list.len()
    );
    for d in list {
        out.push_str(&format!(
            "  #{} {} \"{}\": {} MiB, {}% compute, {} slots, NUMA {}, mode {}, {}\n",
            d.index,
            d.id,
            d.device_type,
            d.devmem,
            d.devcore,
            d.count,
            d.numa,
            d.mode().as_str(),
            if d.health {
                "healthy"
            } else {
                "UNHEALTHY (not schedulable)"
            }
        ));
    }
    out
}

fn allocation(pd: &PodDevices) -> String {
    let mut out = format!(
        "pod device allocation ({} / {}): {} container(s), init containers first\n",
        ann::NVIDIA_DEVICES_ALLOCATED,
        ann::NVIDIA_DEVICES_TO_ALLOCATE,
        pd.0.len()
    );
    for (i, c) in pd.0.iter().enumerate() {
        if c.is_empty() {
            out.push_str(&format!("  container {i}: no device\n"));
        }
        for d in c {
            let cores = if d.cores == 0 {
                "no compute limit".to_string()
            } else if d.cores >= 100 {
                "100% compute (exclusive)".to_string()
            } else {
                format!("{}% compute", d.cores)
            };
            out.push_str(&format!(
                "  container {i}: {} ({}): {} MiB, {cores}\n",
                d.uuid, d.vendor, d.mem
            ));
        }
    }
    out
}

fn handshake(h: &Handshake) -> String {
    match h {
        Handshake::Requesting(t) => format!(
            "node handshake: the scheduler asked the device plugin to report at {t}; if it has not answered within 60 s and the node advertises no nvidia.com/gpu, the node's devices are dropped\n"
        ),
        Handshake::Reported(v) => format!(
            "node handshake: the device plugin reported ({v}); the scheduler will answer with Requesting_<now>\n"
        ),
        Handshake::Deleted(v) => {
            format!("node handshake: the scheduler dropped this node's devices ({v})\n")
        }
    }
}

fn pair_scores(scores: &[DevicePairScore]) -> String {
    let mut out = format!(
        "GPU topology pair scores ({}): higher is a faster link\n",
        ann::NODE_NVIDIA_SCORE
    );
    for sc in scores {
        for (other, n) in &sc.score {
            out.push_str(&format!(
                "  {} <-> {other}: {n} ({})\n",
                sc.uuid,
                link_words(*n)
            ));
        }
    }
    out
}

fn link_words(score: i64) -> String {
    match score {
        s if s >= 100 => format!("{} NVLink(s)", s / 100),
        60 => "same board".into(),
        50 => "single PCIe switch".into(),
        40 => "multiple PCIe switches".into(),
        30 => "host bridge".into(),
        20 => "same CPU".into(),
        10 => "across CPUs".into(),
        _ => "custom".into(),
    }
}

fn cordon(list: &[String]) -> String {
    format!(
        "cordoned cards ({}): {} card(s) get no new allocations: {}\n",
        ann::DEVICE_CORDON,
        list.len(),
        list.join(", ")
    )
}

fn lock(l: &NodeLock) -> String {
    if l.namespace.is_empty() {
        format!(
            "node bind lock ({}): taken at {} (old format, no holder)\n",
            ann::NODE_LOCK,
            l.since
        )
    } else {
        format!(
            "node bind lock ({}): held by pod {}/{} since {}\n",
            ann::NODE_LOCK,
            l.namespace,
            l.pod,
            l.since
        )
    }
}

fn weights(w: &ScoringWeights) -> String {
    format!(
        "GPU score weights ({}): slot x{}, compute x{}, memory x{}\n",
        ann::DEVICE_SCORING_WEIGHTS,
        w.slot,
        w.core,
        w.memory
    )
}

fn gpu_policy(p: &GpuPolicySpec) -> String {
    use hami_api::policy::GpuPolicy;
    let (name, words) = match p.policy {
        Some(GpuPolicy::Binpack) => ("binpack", "fill the fullest card first"),
        Some(GpuPolicy::Spread) => ("spread", "prefer the emptiest card"),
        Some(GpuPolicy::TopologyAware) => (
            "topology-aware",
            "multi-card containers get the best-linked cards",
        ),
        Some(GpuPolicy::Mutex) => ("mutex", "only cards nobody else uses"),
        None => ("default", "the scheduler's configured GPU policy"),
    };
    let numa = if p.numa {
        "; all cards of a container on one NUMA node"
    } else {
        ""
    };
    format!("GPU policy {name}: {words}{numa}\n")
}

fn node_policy_words(p: NodePolicy) -> &'static str {
    match p {
        NodePolicy::Binpack => "fill the fullest node first",
        NodePolicy::Spread => "prefer the emptiest node",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explain(key: Option<&str>, value: &str) -> Result<String, String> {
        decode(key, value).map(|d| d.text())
    }

    #[test]
    fn guesses_each_format() {
        let cases = [
            ("GPU-a,NVIDIA,3000,30:;", "pod device allocation"),
            (
                r#"[{"id":"GPU-0","count":10,"devmem":15360,"devcore":100,"type":"NVIDIA-Tesla T4","health":true}]"#,
                "1 card(s)",
            ),
            (
                "GPU-a,10,15360,100,NVIDIA-Tesla T4,0,true:",
                "node device registration",
            ),
            ("Requesting_2024-05-06 07:08:09", "asked the device plugin"),
            ("2024-05-06T07:08:09Z,default,p", "held by pod default/p"),
            ("slot=1,core=1,memory=3", "memory x3"),
            ("binpack,numa", "one NUMA node"),
            (r#"[{"uuid":"GPU-a","score":{"GPU-b":200}}]"#, "2 NVLink(s)"),
            ("GPU-a,GPU-b", "2 card(s)"),
        ];
        for (v, want) in cases {
            let got = explain(None, v).unwrap_or_else(|e| panic!("{v}: {e}"));
            assert!(got.contains(want), "{v}: {got}");
        }
        let got = explain(None, ";GPU-a,NVIDIA,1000,100:;").unwrap();
        assert!(got.contains("container 0: no device"), "{got}");
        assert!(got.contains("exclusive"), "{got}");
    }

    #[test]
    fn keys_pick_the_format_and_errors_explain() {
        let got = explain(Some(ann::NODE_SCHEDULER_POLICY), "spread").unwrap();
        assert!(got.contains("emptiest node"));
        let e = explain(Some(ann::NVIDIA_DEVICES_ALLOCATED), "GPU-a,NVIDIA,lots,3:").unwrap_err();
        assert!(e.contains("memory \"lots\""), "{e}");
        assert!(explain(None, "hello world").is_err());
        assert!(explain(Some("hami.io/unknown"), "x").is_err());
    }
}
