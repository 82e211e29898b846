//! `hami schedule`: place pods on a snapshot of a cluster with the engine,
//! one after another, and say why every other node was rejected.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;

use hami_api::ContainerDevice;
use hami_api::annotations as ann;
use hami_api::node::NodeLock;
use hami_sched::{
    Admission, BindInFlight, BusyRule, Engine, LockHolder, Mode, Policies, Reason, Snapshot,
    pod_key,
};
use jiff::{SignedDuration, Timestamp};

use crate::input::{InputError, load_config, load_objects};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// Nodes and Pods of the cluster: a `kubectl get nodes,pods -A -o yaml` dump (List or multi-document YAML).
    #[arg(long, value_name = "FILE")]
    pub snapshot: PathBuf,
    /// The pods to place, in order; each decision is applied before the next pod.
    #[arg(long, value_name = "FILE")]
    pub pod: PathBuf,
    /// device-config.yaml (or the hami-scheduler-device ConfigMap); HAMi defaults when absent.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Default node policy when a pod does not set hami.io/node-scheduler-policy.
    #[arg(long, default_value = "binpack")]
    pub node_policy: hami_api::policy::NodePolicy,
    /// Default GPU policy when a pod does not set hami.io/gpu-scheduler-policy.
    #[arg(long, default_value = "spread")]
    pub gpu_policy: hami_api::policy::GpuPolicy,
    /// Skip the webhook's defaults and checks (the pods are taken as already admitted).
    #[arg(long)]
    pub no_admission: bool,
    /// `table` for people, `json` for programs (stdout holds the JSON alone).
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
    /// The moment the snapshot was taken (RFC 3339), for the age of node
    /// bind locks; default: now.
    #[arg(long, value_name = "TIME")]
    pub now: Option<Timestamp>,
    /// Seconds a bind lock must be held before a binpack pod passes its node
    /// over (the scheduler's setting; spread pods pass over at once).
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub lock_busy_after: u32,
}

/// One element of the JSON output (a stable interface, see docs/cli.md).
#[derive(Debug, Serialize)]
pub struct Placement {
    pub pod: String,
    pub node: Option<String>,
    pub annotations: BTreeMap<String, String>,
    /// One list per container, init containers first; `[]` for containers without a GPU.
    pub devices: Vec<Vec<ContainerDevice>>,
    /// Rejected node -> reason.
    pub failed: BTreeMap<String, String>,
    /// Set when the pod could not be considered at all (denied, bad values, no GPU asked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn execute(args: ScheduleArgs) -> Result<i32, InputError> {
    let config = load_config(args.config.as_deref())?;
    let engine = Engine::from_config(
        &config,
        Policies {
            node: args.node_policy,
            gpu: args.gpu_policy,
        },
    );
    let cluster = load_objects(&args.snapshot)?;
    warn_skipped(&args.snapshot, &cluster.skipped);
    let mut snapshot = Snapshot::new();
    for node in &cluster.nodes {
        if let Err(e) = engine.add_node(&mut snapshot, node) {
            eprintln!(
                "warning: {}: node {}: {e}; the node is left out, as the scheduler would",
                args.snapshot.display(),
                node.metadata.name.as_deref().unwrap_or("?")
            );
        }
    }
    for pod in &cluster.pods {
        match engine.pod_record(pod) {
            Ok(Some(record)) => snapshot.add_pod(&pod_key(pod), record),
            Ok(None) => {}
            Err(e) => eprintln!(
                "warning: {}: pod {}: {e}; it is counted as holding nothing",
                args.snapshot.display(),
                pod_key(pod)
            ),
        }
    }
    let now = args.now.unwrap_or_else(Timestamp::now);
    record_binds_in_flight(&mut snapshot, &args.snapshot, &cluster, now);
    let rule = BusyRule {
        now,
        busy_after: SignedDuration::from_secs(i64::from(args.lock_busy_after)),
    };
    let incoming = load_objects(&args.pod)?;
    warn_skipped(&args.pod, &incoming.skipped);
    if incoming.pods.is_empty() {
        return Err(InputError::file(
            &args.pod.display().to_string(),
            "holds no Pod",
        ));
    }
    let mut placements = Vec::new();
    for mut pod in incoming.pods {
        placements.push(place(
            &engine,
            &mut snapshot,
            &mut pod,
            !args.no_admission,
            rule,
        ));
    }
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&placements).expect("placements serialize")
        ),
        Output::Table => print_table(&placements),
    }
    Ok(if placements.iter().all(|p| p.node.is_some()) {
        0
    } else {
        1
    })
}

fn warn_skipped(file: &std::path::Path, kinds: &[String]) {
    if !kinds.is_empty() {
        eprintln!(
            "note: {}: skipped {} object(s) of kind {}",
            file.display(),
            kinds.len(),
            kinds.join(", ")
        );
    }
}

/// Every node's bind lock (`hami.io/mutex.lock`) as a bind in flight, with
/// its holder from the same dump, as the extender sees them.
fn record_binds_in_flight(
    snapshot: &mut Snapshot,
    file: &std::path::Path,
    cluster: &crate::input::Objects,
    now: Timestamp,
) {
    for node in &cluster.nodes {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let Some(value) = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ann::NODE_LOCK))
        else {
            continue;
        };
        let lock = match NodeLock::decode(value) {
            Ok(lock) => lock,
            Err(e) => {
                eprintln!(
                    "warning: {}: node {name}: {e}; its lock is ignored",
                    file.display()
                );
                continue;
            }
        };
        let holder_key = format!("{}/{}", lock.namespace, lock.pod);
        let holder = cluster
            .pods
            .iter()
            .find(|p| pod_key(p) == holder_key)
            .map(LockHolder::of);
        snapshot.set_bind_in_flight(name, BindInFlight::from_lock(name, &lock, holder, now));
    }
}

fn place(
    engine: &Engine,
    snapshot: &mut Snapshot,
    pod: &mut k8s_openapi::api::core::v1::Pod,
    admit: bool,
    rule: BusyRule,
) -> Placement {
    let key = pod_key(pod);
    let mut placement = Placement {
        pod: key,
        node: None,
        annotations: BTreeMap::new(),
        devices: Vec::new(),
        failed: BTreeMap::new(),
        error: None,
    };
    if admit
        && let Admission::Denied(why) = engine.admit(pod, hami_api::annotations::SCHEDULER_NAME)
    {
        placement.error = Some(format!("denied by admission: {why}"));
        return placement;
    }
    let request = match engine.prepare(pod) {
        Ok(Some(r)) => r,
        Ok(None) => {
            placement.error =
                Some("asks for no device managed by hami; kube-scheduler places it alone".into());
            return placement;
        }
        Err(e) => {
            placement.error = Some(e.to_string());
            return placement;
        }
    };
    let decision = engine.filter_avoiding_busy(snapshot, &request, None, Mode::Explain, rule);
    placement.failed = decision
        .rejected
        .iter()
        .map(|(n, r)| (n.to_string(), r.to_string()))
        .chain(
            decision
                .busy
                .iter()
                .map(|(n, b)| (n.to_string(), b.reason())),
        )
        .collect();
    placement.annotations = match decision.node {
        Some(node) => engine.decision_annotations(
            node,
            &decision.devices,
            Some(&request),
            snapshot.node(node),
            now_ns(),
        ),
        None => BTreeMap::new(),
    };
    placement.devices = decision.devices.0.clone();
    let node = decision.node.map(str::to_string);
    if let Some(node) = &node {
        engine.reserve(snapshot, &request, node, decision.devices);
    }
    placement.node = node;
    placement
}

/// Rejections shown per pod before they are summarized by reason.
const SHOWN_REJECTIONS: usize = 12;

fn print_table(placements: &[Placement]) {
    for p in placements {
        match (&p.node, &p.error) {
            (_, Some(e)) => println!("{}: not placed: {e}", p.pod),
            (Some(node), None) => {
                println!("{} -> {node}", p.pod);
                for (i, container) in p.devices.iter().enumerate() {
                    for d in container {
                        println!(
                            "    container {i}: {} {} MiB, {}% cores",
                            d.uuid, d.mem, d.cores
                        );
                    }
                }
            }
            (None, None) => println!("{}: not placed: no node fits", p.pod),
        }
        if p.failed.is_empty() {
            continue;
        }
        let title = if p.node.is_some() {
            "other nodes rejected"
        } else {
            "rejected"
        };
        println!("    {title} ({}):", p.failed.len());
        for (node, reason) in p.failed.iter().take(SHOWN_REJECTIONS) {
            println!("      {node}: {reason}");
        }
        if p.failed.len() > SHOWN_REJECTIONS {
            let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
            for reason in p.failed.values().skip(SHOWN_REJECTIONS) {
                *by_reason.entry(main_reason(reason)).or_default() += 1;
            }
            let summary: Vec<String> = by_reason.iter().map(|(r, n)| format!("{n} {r}")).collect();
            println!(
                "      ... {} more: {}",
                p.failed.len() - SHOWN_REJECTIONS,
                summary.join(", ")
            );
        }
    }
    let placed = placements.iter().filter(|p| p.node.is_some()).count();
    println!("{placed}/{} pods placed", placements.len());
    let seen: Vec<Reason> = Reason::ALL
        .into_iter()
        .filter(|r| {
            placements
                .iter()
                .any(|p| p.failed.values().any(|f| f.contains(r.as_str())))
        })
        .collect();
    if !seen.is_empty() {
        println!("reasons:");
        for r in seen {
            println!("  {}: {}", r.as_str(), r.explain());
        }
    }
}

/// The reason word of the first (most frequent) entry of a formatted rejection.
fn main_reason(formatted: &str) -> &str {
    let first = formatted.split(", ").next().unwrap_or(formatted);
    first.rsplit(' ').next().unwrap_or(first)
}

/// Unix nanoseconds now, for the time annotations some vendors' plugins read.
fn now_ns() -> i128 {
    Timestamp::now().as_nanosecond()
}
