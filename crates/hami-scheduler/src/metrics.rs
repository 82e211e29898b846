//! Scheduler metrics (spec section 9): HAMi's names and labels, computed
//! from the engine's snapshot at scrape time, plus latency histograms of
//! Filter and Bind.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use hami_sched::Snapshot;

const MIB: f64 = 1024.0 * 1024.0;

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

type Labels = Vec<(&'static str, String)>;
type F64Gauge = Gauge<f64, AtomicU64>;

fn family() -> Family<Labels, F64Gauge> {
    Family::default()
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
        let node_mem_ratio = family();
        let vgpu_mem = family();
        let vgpu_core = family();
        let build = family();
        for node in snapshot.nodes() {
            for d in &node.devices {
                let labels: Labels = vec![
                    ("node", node.name.clone()),
                    ("device_uuid", d.info.id.clone()),
                    ("device_index", d.info.index.to_string()),
                    ("device_type", d.info.device_type.clone()),
                ];
                mem_limit
                    .get_or_create(&labels)
                    .set(d.info.devmem as f64 * MIB);
                core_limit
                    .get_or_create(&labels)
                    .set(f64::from(d.info.devcore) / 100.0);
                mem_alloc
                    .get_or_create(&labels)
                    .set(d.used.mem as f64 * MIB);
                shared.get_or_create(&labels).set(f64::from(d.used.slots));
                core_alloc
                    .get_or_create(&labels)
                    .set(f64::from(d.used.cores) / 100.0);
                let mut o = labels.clone();
                o.push(("device_count", d.info.count.to_string()));
                o.push(("device_mem_mib", d.info.devmem.to_string()));
                o.push(("device_core", d.info.devcore.to_string()));
                o.push(("healthy", d.usable().to_string()));
                overview.get_or_create(&o).set(f64::from(d.used.slots));
            }
            let t = &node.totals;
            if t.mem > 0 {
                node_mem_ratio
                    .get_or_create(&vec![("node", node.name.clone())])
                    .set(t.used_mem as f64 / t.mem as f64);
            }
        }
        for (key, record) in snapshot.pods() {
            let (namespace, pod) = key.split_once('/').unwrap_or(("", key));
            for (ci, container) in record.devices.0.iter().enumerate() {
                for d in container {
                    let labels: Labels = vec![
                        ("namespace", namespace.to_string()),
                        ("node", record.node.clone()),
                        ("pod", pod.to_string()),
                        ("container_index", ci.to_string()),
                        ("device_uuid", d.uuid.clone()),
                    ];
                    vgpu_mem.get_or_create(&labels).set(d.mem as f64 * MIB);
                    vgpu_core
                        .get_or_create(&labels)
                        .set(f64::from(d.cores) / 100.0);
                }
            }
        }
        build
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
            .set(1.0);
        reg.register(
            "hami_gpu_memory_limit_bytes",
            "Device memory of the GPU as registered (bytes)",
            mem_limit,
        );
        reg.register(
            "hami_gpu_core_limit_ratio",
            "Compute of the GPU as registered (1 = the whole card)",
            core_limit,
        );
        reg.register(
            "hami_gpu_memory_allocated_bytes",
            "Device memory allocated to pods on the GPU (bytes)",
            mem_alloc,
        );
        reg.register(
            "hami_gpu_shared_count",
            "Containers sharing the GPU",
            shared,
        );
        reg.register(
            "hami_gpu_core_allocated_ratio",
            "Compute allocated to pods on the GPU (1 = the whole card)",
            core_alloc,
        );
        reg.register(
            "hami_node_gpu_overview",
            "One series per GPU with its registration as labels; value: containers sharing it",
            overview,
        );
        reg.register(
            "hami_node_gpu_memory_allocated_ratio",
            "Allocated over registered device memory of the node's GPUs",
            node_mem_ratio,
        );
        reg.register(
            "hami_vgpu_memory_allocated_bytes",
            "Device memory allocated to one container on one GPU (bytes)",
            vgpu_mem,
        );
        reg.register(
            "hami_vgpu_core_allocated_ratio",
            "Compute allocated to one container on one GPU (1 = the whole card)",
            vgpu_core,
        );
        reg.register("hami_build_info", "hami-scheduler build", build);
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
