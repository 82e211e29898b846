//! The node monitor's loop and its HTTP listener: HAMi's vgpu-monitor
//! metrics (spec section 9) on HAMi's port (9394 in the pod; HAMi's chart
//! exposes it as NodePort 31992).
//!
//! Callers of the listener: Prometheus (or anyone who can reach the port)
//! with `GET /metrics` and `GET /healthz`; it serves nothing else, takes
//! no input and changes nothing. The metrics name pods and namespaces: keep
//! the port inside the cluster network.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::monitor::{ContainerDevice, HostCard, HostGpus, Monitor, PodView};

/// What the last scan found, for the listener.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub containers: Vec<ContainerDevice>,
    pub host: Vec<HostCard>,
    /// Scans done since start.
    pub scans: u64,
}

pub type Shared = Arc<RwLock<Published>>;

type Labels = Vec<(&'static str, String)>;
type F64Gauge = Gauge<f64, AtomicU64>;

/// Every monitor metric, in the Prometheus text format.
pub fn render(p: &Published) -> String {
    let family = Family::<Labels, F64Gauge>::default;
    let (host_mem, host_util) = (family(), family());
    let (vmem_used, vmem_limit, ctr_mem, ctr_util, ctr_last) =
        (family(), family(), family(), family(), family());
    let build = family();
    for c in &p.host {
        let l: Labels = vec![
            ("device_index", c.index.to_string()),
            ("device_uuid", c.uuid.clone()),
            ("device_type", c.device_type.clone()),
        ];
        host_mem.get_or_create(&l).set(c.used_bytes as f64);
        host_util.get_or_create(&l).set(c.utilization);
    }
    for d in &p.containers {
        let l: Labels = vec![
            ("namespace", d.namespace.clone()),
            ("pod", d.pod.clone()),
            ("container", d.container.clone()),
            ("vdevice_index", d.vdevice_index.to_string()),
            ("device_uuid", d.usage.device_uuid.clone()),
        ];
        let u = &d.usage;
        vmem_used.get_or_create(&l).set(u.used_bytes as f64);
        vmem_limit.get_or_create(&l).set(u.limit_bytes as f64);
        ctr_mem.get_or_create(&l).set(u.used_bytes as f64);
        ctr_util.get_or_create(&l).set(u.utilization);
        if let Some(s) = u.last_kernel_secs {
            ctr_last.get_or_create(&l).set(s);
        }
    }
    build
        .get_or_create(&hami_api::build_info::labels())
        .set(1.0);
    let mut reg = Registry::default();
    reg.register(
        "hami_host_gpu_memory_used_bytes",
        "Device memory in use on the GPU, as NVML reports it, in bytes",
        host_mem,
    );
    reg.register(
        "hami_host_gpu_utilization_ratio",
        "GPU utilization as NVML reports it, in percent",
        host_util,
    );
    reg.register(
        "hami_vgpu_memory_used_bytes",
        "Device memory the container's live processes hold on the virtual device, in bytes",
        vmem_used,
    );
    reg.register(
        "hami_vgpu_memory_limit_bytes",
        "Device memory limit of the container's virtual device, in bytes (0: none)",
        vmem_limit,
    );
    reg.register(
        "hami_container_device_memory_bytes",
        "Device memory the container holds on the virtual device, in bytes",
        ctr_mem,
    );
    reg.register(
        "hami_container_device_utilization_ratio",
        "Share of the card the container's kernels kept busy over the last scan, in percent",
        ctr_util,
    );
    reg.register(
        "hami_container_last_kernel_elapsed_seconds",
        "Seconds since the container last launched a kernel on the device",
        ctr_last,
    );
    reg.register("hami_build_info", "Build information", build);
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String");
    out
}

/// Watches the pods of this node (`spec.nodeName`) into a store.
pub fn pod_store(
    client: kube::Client,
    node: &str,
) -> (
    reflector::Store<Pod>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let api: kube::Api<Pod> = kube::Api::all(client);
    let (reader, writer) = reflector::store();
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = reflector(writer, watcher(api, cfg))
        .default_backoff()
        .touched_objects();
    let run = async move {
        futures::pin_mut!(stream);
        while let Some(r) = stream.next().await {
            if let Err(e) = r {
                tracing::warn!("watching this node's pods: {e}");
            }
        }
    };
    (reader, run)
}

fn pods_by_uid(store: &reflector::Store<Pod>) -> HashMap<String, PodView> {
    store
        .state()
        .iter()
        .filter_map(|p| PodView::from_pod(p))
        .collect()
}

/// Scans every `period` and publishes what it found, until the process ends.
pub async fn run(
    monitor: Monitor,
    pods: reflector::Store<Pod>,
    host: Option<Arc<dyn HostGpus>>,
    period: Duration,
    shared: Shared,
    priority: Option<std::sync::mpsc::Sender<Vec<crate::priority::PriorityRegion>>>,
) {
    let mut monitor = Some(monitor);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Labels and removals wait for the first full list of pods.
        let known = pods.wait_until_ready().now_or_never().is_some();
        let view = known.then(|| pods_by_uid(&pods));
        let mut m = monitor
            .take()
            .expect("the monitor is put back after each scan");
        let host = host.clone();
        let (m, scan, cards) = tokio::task::spawn_blocking(move || {
            let cards = host.map(|h| h.cards()).unwrap_or_default();
            m.set_card_utilization(&cards);
            let scan = m.scan(view.as_ref(), hami_shm::region::monotonic_ns());
            (m, scan, cards)
        })
        .await
        .expect("a monitor scan panicked");
        monitor = Some(m);
        if let Some(tx) = &priority {
            let _ = tx.send(scan.priority);
        }
        let mut p = shared.write().expect("not poisoned");
        p.containers = scan.containers;
        p.host = cards;
        p.scans += 1;
    }
}

/// Serves `/metrics` and `/healthz` on `addr`; returns the bound address
/// (the port of `:0` resolved) and the server's future.
pub async fn serve(
    addr: SocketAddr,
    shared: Shared,
) -> anyhow::Result<(SocketAddr, impl std::future::Future<Output = ()> + Send)> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the node monitor's listener {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(
                |axum::extract::State(s): axum::extract::State<Shared>| async move {
                    let text = render(&s.read().expect("not poisoned"));
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                },
            ),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(shared);
    let server = async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the node monitor's listener stopped: {e}");
        }
    };
    Ok((bound, server))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::DeviceUsage;

    #[test]
    fn renders_hamis_names_and_labels() {
        let p = Published {
            containers: vec![ContainerDevice {
                namespace: "team".into(),
                pod: "train".into(),
                container: "main".into(),
                vdevice_index: 0,
                usage: DeviceUsage {
                    device_uuid: "GPU-a".into(),
                    used_bytes: 1 << 20,
                    limit_bytes: 3 << 20,
                    utilization: 12.5,
                    last_kernel_secs: Some(2.0),
                },
            }],
            host: vec![HostCard {
                index: 0,
                uuid: "GPU-a".into(),
                device_type: "NVIDIA Sim".into(),
                used_bytes: 5 << 20,
                utilization: 40.0,
            }],
            scans: 1,
        };
        let text = render(&p);
        let ctr = r#"{namespace="team",pod="train",container="main",vdevice_index="0",device_uuid="GPU-a"}"#;
        for line in [
            format!("hami_vgpu_memory_used_bytes{ctr} 1048576.0"),
            format!("hami_vgpu_memory_limit_bytes{ctr} 3145728.0"),
            format!("hami_container_device_memory_bytes{ctr} 1048576.0"),
            format!("hami_container_device_utilization_ratio{ctr} 12.5"),
            format!("hami_container_last_kernel_elapsed_seconds{ctr} 2.0"),
            r#"hami_host_gpu_memory_used_bytes{device_index="0",device_uuid="GPU-a",device_type="NVIDIA Sim"} 5242880.0"#.to_string(),
            r#"hami_host_gpu_utilization_ratio{device_index="0",device_uuid="GPU-a",device_type="NVIDIA Sim"} 40.0"#.to_string(),
        ] {
            assert!(text.contains(&line), "no {line} in\n{text}");
        }
        assert!(text.contains("hami_build_info{version="), "{text}");
    }
}
