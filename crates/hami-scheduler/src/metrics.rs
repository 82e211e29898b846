//! Scheduler metrics (spec section 9), computed from the engine's snapshot
//! at scrape time: HAMi's scheduler metric names, label names and units
//! (upstream `cmd/scheduler/metrics.go`, `--legacy-metrics=false`), plus
//! latency histograms of Filter and Bind, which are ours.
//!
//! Units are HAMi's, whatever a name suggests: memory in bytes, the
//! `*_core_*_ratio` metrics in percent of one card (100 = the whole card),
//! `hami_node_gpu_memory_allocated_ratio` a fraction of one card's memory
//! (0..1). Every metric but `hami_build_info` carries `zone="vGPU"`, the
//! constant label HAMi's scheduler collector is registered with.
//!
//! Not emitted: `hami_node_gpu_mig_instance_info` (no MIG instances are
//! tracked) and `hami_resource_quota_used`/`_limit` (no device quotas);
//! HAMi emits no series of them either without MIG instances or quotas.
//! The legacy names of `--legacy-metrics` are not emitted.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use hami_sched::Snapshot;

/// The `zone` label of every scheduler metric, as HAMi sets it.
pub const ZONE: &str = "vGPU";

/// Histograms that live across scrapes.
#[derive(Clone)]
pub struct Metrics {
    pub filter_duration: Histogram,
    pub bind_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        // 100 us .. ~52 s.
        let buckets =
            || prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 20);
        Metrics {
            filter_duration: Histogram::new(buckets()),
            bind_duration: Histogram::new(buckets()),
        }
    }
}

type Label = (&'static str, String);
type Labels = Vec<Label>;
type F64Gauge = Gauge<f64, AtomicU64>;

fn family() -> Family<Labels, F64Gauge> {
    Family::default()
}

fn bytes(mib: u64) -> f64 {
    mib as f64 * 1024.0 * 1024.0
}

impl Metrics {
    /// Renders every metric in the Prometheus text format.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut reg = Registry::default();
        let mem_limit = family();
        let core_limit = family();
        let mem_alloc = family();
        let shared = family();
        let core_alloc = family();
        let overview = family();
        let mem_ratio = family();
        let vgpu_mem = family();
        let vgpu_core = family();
        let build = family();
        let zone: Label = ("zone", ZONE.to_string());
        for node in snapshot.nodes() {
            for d in &node.devices {
                let node_l: Label = ("node", node.name.clone());
                let uuid: Label = ("device_uuid", d.info.id.clone());
                let index: Label = ("device_index", d.info.index.to_string());
                let dtype: Label = ("device_type", d.info.device_type.clone());
                let cores: Label = ("device_cores", d.info.devcore.to_string());
                let per_gpu: Labels = vec![
                    node_l.clone(),
                    uuid.clone(),
                    index.clone(),
                    dtype.clone(),
                    zone.clone(),
                ];
                let with_cores: Labels = vec![
                    node_l.clone(),
                    uuid.clone(),
                    index.clone(),
                    cores.clone(),
                    dtype.clone(),
                    zone.clone(),
                ];
                let with_registration: Labels = vec![
                    node_l,
                    uuid,
                    index,
                    cores,
                    ("device_memory_limit", d.info.devmem.to_string()),
                    dtype,
                    zone.clone(),
                ];
                mem_limit.get_or_create(&per_gpu).set(bytes(d.info.devmem));
                core_limit
                    .get_or_create(&per_gpu)
                    .set(f64::from(d.info.devcore));
                mem_alloc.get_or_create(&with_cores).set(bytes(d.used.mem));
                shared.get_or_create(&per_gpu).set(f64::from(d.used.slots));
                core_alloc
                    .get_or_create(&per_gpu)
                    .set(f64::from(d.used.cores));
                overview
                    .get_or_create(&with_registration)
                    .set(bytes(d.used.mem));
                if d.info.devmem > 0 {
                    mem_ratio
                        .get_or_create(&per_gpu)
                        .set(d.used.mem as f64 / d.info.devmem as f64);
                }
            }
        }
        for (key, record) in snapshot.pods() {
            let (namespace, pod) = key.split_once('/').unwrap_or(("", key));
            for (ci, container) in record.devices.0.iter().enumerate() {
                for d in container {
                    if d.uuid.is_empty() {
                        continue;
                    }
                    let labels: Labels = vec![
                        ("namespace", namespace.to_string()),
                        ("node", record.node.clone()),
                        ("pod", pod.to_string()),
                        ("container_index", ci.to_string()),
                        ("device_uuid", d.uuid.clone()),
                        zone.clone(),
                    ];
                    vgpu_mem.get_or_create(&labels).set(bytes(d.mem));
                    vgpu_core.get_or_create(&labels).set(f64::from(d.cores));
                }
            }
        }
        build
            .get_or_create(&hami_api::build_info::labels())
            .set(1.0);
        reg.register(
            "hami_gpu_memory_limit_bytes",
            "Device memory of the GPU as registered, in bytes",
            mem_limit,
        );
        reg.register(
            "hami_gpu_core_limit_ratio",
            "Compute of the GPU as registered, in percent of the card",
            core_limit,
        );
        reg.register(
            "hami_gpu_memory_allocated_bytes",
            "Device memory allocated to pods on the GPU, in bytes",
            mem_alloc,
        );
        reg.register(
            "hami_gpu_shared_count",
            "Container devices placed on the GPU",
            shared,
        );
        reg.register(
            "hami_gpu_core_allocated_ratio",
            "Compute allocated to pods on the GPU, in percent of the card",
            core_alloc,
        );
        reg.register(
            "hami_node_gpu_overview",
            "One series per GPU, its registration in labels; value: device memory allocated, in bytes",
            overview,
        );
        reg.register(
            "hami_node_gpu_memory_allocated_ratio",
            "Allocated over registered device memory of the GPU (0 to 1)",
            mem_ratio,
        );
        reg.register(
            "hami_vgpu_memory_allocated_bytes",
            "Device memory allocated to one container on one GPU, in bytes",
            vgpu_mem,
        );
        reg.register(
            "hami_vgpu_core_allocated_ratio",
            "Compute allocated to one container on one GPU, in percent of the card",
            vgpu_core,
        );
        reg.register(
            "hami_build_info",
            "hami-scheduler build, in labels; value 1",
            build,
        );
        reg.register(
            "hami_scheduler_filter_duration_seconds",
            "Time to answer one extender Filter call",
            self.filter_duration.clone(),
        );
        reg.register(
            "hami_scheduler_bind_duration_seconds",
            "Time to answer one extender Bind call",
            self.bind_duration.clone(),
        );
        let mut out = String::new();
        encode(&mut out, &reg).expect("writing to a String cannot fail");
        out
    }
}
