//! The event-driven simulator: pods of a workload arrive and leave over
//! simulated time and the engine places them, exactly as the extender
//! would. Deterministic for a given seed.

pub mod model;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use hami_api::device::DeviceInfo;
use hami_api::topology::DevicePairScore;
use hami_api::{ContainerRequest, NvidiaConfig};

use crate::engine::{Engine, Mode, PodRequest, PodScratch};
use crate::snapshot::{NodeDevices, PodRecord, Snapshot, Usage};
use crate::vendor::Admission;
pub use model::{ClusterSpec, Lifetime, Pattern, PodGroup, Seconds, Workload};

/// Why a simulation cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("group {group:?}: {message}")]
    Group { group: String, message: String },
    #[error("the cluster has no GPU nodes")]
    EmptyCluster,
}

/// The node names and cards of a compact cluster description.
pub fn build_cluster(spec: &ClusterSpec, config: &NvidiaConfig) -> Snapshot {
    let mut snapshot = Snapshot::new();
    for group in &spec.nodes {
        let g = &group.gpus;
        for n in 0..group.count {
            let name = format!("{}-{n}", group.name);
            let devices: Vec<DeviceInfo> = (0..g.count)
                .map(|i| DeviceInfo {
                    id: format!("GPU-{name}-{i}"),
                    index: i,
                    count: g.split.unwrap_or(config.device_split_count),
                    devmem: (g.memory as f64 * config.device_memory_scaling) as u64,
                    devcore: (100.0 * config.device_core_scaling) as u32,
                    device_type: g.model.clone(),
                    numa: g
                        .numa
                        .as_ref()
                        .and_then(|v| v.get(i as usize).copied())
                        .unwrap_or(0),
                    mode: None,
                    mig_profiles: None,
                    custom_info: None,
                    health: true,
                })
                .collect();
            let pair_scores = match g.link_score {
                Some(score) => devices
                    .iter()
                    .map(|a| DevicePairScore {
                        uuid: a.id.clone(),
                        score: devices
                            .iter()
                            .filter(|b| b.id != a.id)
                            .map(|b| (b.id.clone(), score))
                            .collect(),
                    })
                    .collect(),
                None => Vec::new(),
            };
            snapshot.upsert_node(
                &name,
                NodeDevices {
                    devices,
                    pair_scores,
                    ..Default::default()
                },
            );
        }
    }
    snapshot
}

/// The Pod a group's members look like, passed through admission like a
/// real pod would be, then parsed by the engine.
pub fn group_request(engine: &Engine, group: &PodGroup) -> Result<PodRequest, SimError> {
    let err = |message: String| SimError::Group {
        group: group.name.clone(),
        message,
    };
    let mut limits = BTreeMap::new();
    for (k, v) in &group.resources {
        let text = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            other => return Err(err(format!("resource {k}: {other} is not a quantity"))),
        };
        limits.insert(k.clone(), K8sQuantity(text));
    }
    let mut pod = Pod {
        metadata: ObjectMeta {
            name: Some(group.name.clone()),
            namespace: Some("sim".into()),
            annotations: Some(group.annotations.clone()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "main".into(),
                resources: Some(ResourceRequirements {
                    limits: Some(limits),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Admission::Denied(why) = engine.admit(&mut pod, hami_api::annotations::SCHEDULER_NAME) {
        return Err(err(format!("denied by admission: {why}")));
    }
    match engine.prepare(&pod) {
        Ok(Some(req)) => Ok(req),
        Ok(None) => Err(err("asks for no GPU".into())),
        Err(e) => Err(err(e.to_string())),
    }
}

/// One point of the utilization time series.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Sample {
    pub time: u64,
    /// Allocated fraction of slots, memory and compute, 0-1.
    pub slots: f64,
    pub memory: f64,
    pub cores: f64,
    pub running: u32,
    pub pending: u32,
    /// Fraction of free memory on cards where the median request no longer fits.
    pub fragmentation: f64,
}

/// Per pod group outcome.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct GroupOutcome {
    pub name: String,
    pub pods: u32,
    pub placed: u32,
    pub never_placed: u32,
    pub mean_wait_s: f64,
}

/// What one simulation produced.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct SimReport {
    pub label: String,
    pub pods: u32,
    pub placed: u32,
    /// Pods still waiting when the horizon ended.
    pub never_placed: u32,
    pub placed_on_arrival: u32,
    /// Placed pods that waited at all (placed later than they arrived).
    pub waited: u32,
    /// Mean wait over all placed pods, in seconds.
    pub mean_wait_s: f64,
    pub p95_wait_s: u64,
    pub max_pending: u32,
    pub events: u64,
    pub samples: Vec<Sample>,
    pub groups: Vec<GroupOutcome>,
}

impl SimReport {
    fn mean(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        self.samples.iter().map(&f).sum::<f64>() / self.samples.len() as f64
    }
    pub fn mean_slots(&self) -> f64 {
        self.mean(|s| s.slots)
    }
    pub fn mean_memory(&self) -> f64 {
        self.mean(|s| s.memory)
    }
    pub fn mean_cores(&self) -> f64 {
        self.mean(|s| s.cores)
    }
    pub fn mean_fragmentation(&self) -> f64 {
        self.mean(|s| s.fragmentation)
    }
    pub fn peak_memory(&self) -> f64 {
        self.samples.iter().map(|s| s.memory).fold(0.0, f64::max)
    }
}

struct SimPod {
    group: usize,
    key: String,
    arrival: u64,
    duration: u64,
    placed_at: Option<u64>,
}

/// Number of utilization samples over the horizon.
pub const SAMPLES: u64 = 288;

/// Runs the workload on the cluster with the engine's policies. `progress`
/// is called with (events done, events expected) now and then.
pub fn simulate(
    engine: &Engine,
    cluster: &Snapshot,
    workload: &Workload,
    label: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SimReport, SimError> {
    if cluster.nodes().is_empty() {
        return Err(SimError::EmptyCluster);
    }
    let requests: Vec<PodRequest> = workload
        .groups
        .iter()
        .map(|g| group_request(engine, g))
        .collect::<Result<_, _>>()?;
    let mut pods = arrivals(workload)?;
    let median = median_request(&requests, workload);
    let mut snapshot = cluster.clone();
    let horizon = workload.horizon.0;
    let total_events = pods.len() as u64 * 2;
    let mut report = SimReport {
        label: label.to_string(),
        pods: pods.len() as u32,
        ..Default::default()
    };
    let mut departures: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut pending: Vec<usize> = Vec::new();
    let mut running: u32 = 0;
    let mut next_sample: u64 = 0;
    let sample_step = (horizon / SAMPLES).max(1);
    let mut arrivals_iter = 0usize;
    let progress_step = (total_events / 100).max(1);
    progress(0, total_events);

    loop {
        let next_arrival = pods.get(arrivals_iter).map(|p| p.arrival);
        let next_departure = departures.peek().map(|Reverse((t, _))| *t);
        // Departures first at equal times: capacity frees before it is asked for.
        let (t, is_departure) = match (next_arrival, next_departure) {
            (None, None) => break,
            (Some(a), Some(d)) if d <= a => (d, true),
            (Some(a), _) => (a, false),
            (None, Some(d)) => (d, true),
        };
        if t > horizon {
            break;
        }
        let until = t.min(horizon);
        take_samples(
            &mut report.samples,
            &mut next_sample,
            until,
            sample_step,
            || sample_now(&snapshot, running, pending.len() as u32, median.as_ref()),
        );
        report.events += 1;
        if report.events.is_multiple_of(progress_step) {
            progress(report.events, total_events);
        }
        if is_departure {
            let Reverse((_, id)) = departures.pop().expect("peeked");
            let record = snapshot
                .remove_pod(&pods[id].key)
                .expect("running pod is recorded");
            running -= 1;
            // Only this node changed, so a pending pod (which fit nowhere
            // before) can fit only here: trying this node alone gives the
            // same answer as a full filter.
            let Some(node) = snapshot.node(&record.node) else {
                continue;
            };
            let node_name = node.name.clone();
            let mut failed_groups = vec![false; requests.len()];
            let mut still_pending = Vec::with_capacity(pending.len());
            let mut scratch = PodScratch::default();
            for &id in &pending {
                let g = pods[id].group;
                if failed_groups[g] {
                    still_pending.push(id);
                    continue;
                }
                let node = snapshot.node(&node_name).expect("node exists");
                match engine.fit_pod(node, &requests[g], &mut scratch) {
                    Ok(devices) => {
                        place(&mut snapshot, &mut pods[id], &node_name, devices, t);
                        departures.push(Reverse((t + pods[id].duration, id)));
                        running += 1;
                    }
                    Err(_) => {
                        failed_groups[g] = true;
                        still_pending.push(id);
                    }
                }
            }
            pending = still_pending;
        } else {
            let id = arrivals_iter;
            arrivals_iter += 1;
            let req = &requests[pods[id].group];
            let decision = engine.filter(&snapshot, req, None, Mode::Fast);
            let (node, devices) = (decision.node.map(str::to_string), decision.devices);
            match node {
                Some(node) => {
                    place(&mut snapshot, &mut pods[id], &node, devices, t);
                    departures.push(Reverse((t + pods[id].duration, id)));
                    running += 1;
                    report.placed_on_arrival += 1;
                }
                None => {
                    pending.push(id);
                    report.max_pending = report.max_pending.max(pending.len() as u32);
                }
            }
        }
    }
    take_samples(
        &mut report.samples,
        &mut next_sample,
        horizon,
        sample_step,
        || sample_now(&snapshot, running, pending.len() as u32, median.as_ref()),
    );
    progress(total_events, total_events);
    summarize(&mut report, &pods, workload);
    Ok(report)
}

fn place(
    snapshot: &mut Snapshot,
    pod: &mut SimPod,
    node: &str,
    devices: hami_api::PodDevices,
    t: u64,
) {
    snapshot.add_pod(
        &pod.key,
        PodRecord::new(node.to_string(), devices, 0, false),
    );
    pod.placed_at = Some(t);
}

/// Every pod of the workload with its arrival time and lifetime, by arrival.
fn arrivals(workload: &Workload) -> Result<Vec<SimPod>, SimError> {
    let mut pods = Vec::new();
    for (gi, g) in workload.groups.iter().enumerate() {
        let err = |message: String| SimError::Group {
            group: g.name.clone(),
            message,
        };
        let start = g.arrival.start.0;
        let end = g.arrival.end.map_or(workload.horizon.0, |e| e.0);
        if end < start {
            return Err(err(format!(
                "arrival end {} is before start {}",
                Seconds(end),
                Seconds(start)
            )));
        }
        if let Lifetime::Range { min, max } = g.duration
            && max < min
        {
            return Err(err(format!("duration max {max} is below min {min}")));
        }
        // One stream per group, so adding a group leaves the others' draws alone.
        let mut rng = ChaCha8Rng::seed_from_u64(
            workload.seed ^ (gi as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let span = end - start;
        for k in 0..g.count {
            let arrival = match g.arrival.pattern {
                Pattern::Burst => start,
                Pattern::Uniform => start + span * u64::from(k) / u64::from(g.count.max(1)),
                Pattern::Poisson => {
                    if span == 0 {
                        start
                    } else {
                        start + rng.random_range(0..span)
                    }
                }
            };
            let duration = match g.duration {
                Lifetime::Fixed(d) => d.0,
                Lifetime::Range { min, max } => rng.random_range(min.0..=max.0),
            };
            pods.push(SimPod {
                group: gi,
                key: format!("sim/{}-{k}", g.name),
                arrival,
                duration: duration.max(1),
                placed_at: None,
            });
        }
    }
    pods.sort_by_key(|p| (p.arrival, p.group));
    Ok(pods)
}

/// The request at the median of all pods, ordered by memory asked on an
/// 80 GiB card; the yardstick of fragmentation.
fn median_request(requests: &[PodRequest], workload: &Workload) -> Option<ContainerRequest> {
    let mut weighted: Vec<(u64, &ContainerRequest, u32)> = requests
        .iter()
        .zip(&workload.groups)
        .filter_map(|(r, g)| {
            let c = &r.requests().next()?.1.request;
            Some((c.mem_on(81920), c, g.count))
        })
        .collect();
    weighted.sort_by_key(|w| w.0);
    let total: u64 = weighted.iter().map(|w| u64::from(w.2)).sum();
    let mut seen = 0;
    for (_, c, n) in weighted {
        seen += u64::from(n);
        if seen * 2 >= total {
            return Some(c.clone());
        }
    }
    None
}

/// Records the state (as it is now) at every sample time up to `until`:
/// nothing changed between the last event and now.
fn take_samples(
    samples: &mut Vec<Sample>,
    next: &mut u64,
    until: u64,
    step: u64,
    now: impl Fn() -> Sample,
) {
    while *next <= until {
        samples.push(Sample {
            time: *next,
            ..now()
        });
        *next += step;
    }
}

fn sample_now(
    snapshot: &Snapshot,
    running: u32,
    pending: u32,
    median: Option<&ContainerRequest>,
) -> Sample {
    let (mut slots, mut used_slots, mut mem, mut used_mem, mut cores, mut used_cores) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut free_mem, mut stranded) = (0u64, 0u64);
    for node in snapshot.nodes() {
        let t = &node.totals;
        slots += t.slots;
        used_slots += t.used_slots;
        mem += t.mem;
        used_mem += t.used_mem;
        cores += t.cores;
        used_cores += t.used_cores;
        for d in node.devices.iter().filter(|d| d.usable()) {
            let free = d.info.devmem.saturating_sub(d.used.mem);
            free_mem += free;
            if let Some(m) = median
                && !capacity_fits(d.info.count, d.info.devmem, d.info.devcore, d.used, m)
            {
                stranded += free;
            }
        }
    }
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Sample {
        time: 0,
        slots: ratio(used_slots, slots),
        memory: ratio(used_mem, mem),
        cores: ratio(used_cores, cores),
        running,
        pending,
        fragmentation: ratio(stranded, free_mem),
    }
}

/// Whether a card still has room (a slot, memory and compute) for a request.
fn capacity_fits(
    count: u32,
    devmem: u64,
    devcore: u32,
    used: Usage,
    req: &ContainerRequest,
) -> bool {
    used.slots < count
        && devmem.saturating_sub(used.mem) >= req.mem_on(devmem)
        && devcore.saturating_sub(used.cores) >= req.cores
}

fn summarize(report: &mut SimReport, pods: &[SimPod], workload: &Workload) {
    let mut waits: Vec<u64> = Vec::new();
    report.groups = workload
        .groups
        .iter()
        .map(|g| GroupOutcome {
            name: g.name.clone(),
            ..Default::default()
        })
        .collect();
    let mut wait_sums = vec![0u64; workload.groups.len()];
    for p in pods {
        let g = &mut report.groups[p.group];
        g.pods += 1;
        match p.placed_at {
            Some(at) => {
                g.placed += 1;
                let w = at - p.arrival;
                wait_sums[p.group] += w;
                waits.push(w);
            }
            None => g.never_placed += 1,
        }
    }
    for (g, sum) in report.groups.iter_mut().zip(wait_sums) {
        g.mean_wait_s = if g.placed == 0 {
            0.0
        } else {
            sum as f64 / f64::from(g.placed)
        };
    }
    report.placed = waits.len() as u32;
    report.waited = waits.iter().filter(|&&w| w > 0).count() as u32;
    report.never_placed = report.pods - report.placed;
    if !waits.is_empty() {
        report.mean_wait_s = waits.iter().sum::<u64>() as f64 / waits.len() as f64;
        waits.sort_unstable();
        report.p95_wait_s = waits[(waits.len() * 95 / 100).min(waits.len() - 1)];
    }
}

/// A synthetic cluster of `nodes` nodes with `gpus` 80 GiB cards each,
/// filled at random to about `fill` (0-1) of memory with 1-card pods, for
/// benchmarks and load tests. Deterministic for a seed.
pub fn synthetic_cluster(nodes: usize, gpus: u32, fill: f64, seed: u64) -> Snapshot {
    let config = NvidiaConfig::default();
    let spec = ClusterSpec {
        nodes: vec![model::NodeGroup {
            name: "node".into(),
            count: nodes as u32,
            gpus: model::GpuSpec {
                count: gpus,
                model: "NVIDIA A100-SXM4-80GB".into(),
                memory: 81920,
                split: None,
                numa: Some((0..gpus).map(|i| (i * 2 / gpus.max(1)) as i32).collect()),
                link_score: None,
            },
        }],
    };
    let mut snapshot = build_cluster(&spec, &config);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut pod = 0u64;
    let names: Vec<(String, Vec<(String, u64)>)> = snapshot
        .nodes()
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                n.devices
                    .iter()
                    .map(|d| (d.info.id.clone(), d.info.devmem))
                    .collect(),
            )
        })
        .collect();
    for (node, cards) in names {
        for (uuid, devmem) in cards {
            // Per card a target between 0 and 2 x fill, so the mean is `fill`.
            let target = (rng.random_range(0.0..(2.0 * fill).clamp(f64::MIN_POSITIVE, 1.0))
                * devmem as f64) as u64;
            let mut used = 0;
            let mut slots = 0;
            while used < target && slots < config.device_split_count - 1 {
                let mem = rng.random_range(1..=4) * 5000u64;
                if used + mem > devmem {
                    break;
                }
                let cores = rng.random_range(0..=2) * 10;
                used += mem;
                slots += 1;
                pod += 1;
                let devices = hami_api::PodDevices(vec![vec![hami_api::ContainerDevice {
                    uuid: uuid.clone(),
                    vendor: hami_api::NVIDIA.into(),
                    mem,
                    cores,
                }]]);
                snapshot.add_pod(
                    &format!("bench/p{pod}"),
                    PodRecord::new(node.clone(), devices, 0, false),
                );
            }
        }
    }
    snapshot
}
