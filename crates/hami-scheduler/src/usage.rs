//! Live card usage for the dashboard, read from the node monitors
//! (hami-node's `/metrics`): each period the scheduler lists the monitor
//! pods (`--node-monitor-selector`), reads every monitor's
//! `hami_host_gpu_memory_used_bytes` and `hami_host_gpu_utilization_ratio`
//! over plain HTTP, and keeps them by card UUID. A monitor that does not
//! answer in time is skipped; its cards show no usage once their last
//! reading is older than three periods. Nothing here feeds a placement.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One card's usage as its node monitor last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CardUsage {
    /// Device memory in use on the card (every process), MiB.
    pub memory_mi_b: u64,
    /// GPU utilisation, percent.
    pub utilization: f64,
    #[serde(skip)]
    pub at: Timestamp,
}

/// Usage by card UUID, shared between the reader and the dashboard.
#[derive(Clone, Default)]
pub struct LiveUsage(Arc<Mutex<HashMap<String, CardUsage>>>);

impl LiveUsage {
    /// The card's usage, unless it is older than `max_age` at `now`.
    pub fn get(&self, uuid: &str, now: Timestamp, max_age: SignedDuration) -> Option<CardUsage> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(uuid).copied().filter(|u| now - max_age <= u.at)
    }

    /// Adds fresh readings and drops those older than `before` (cards
    /// gone with their node or monitor).
    fn merge(&self, readings: HashMap<String, CardUsage>, before: Timestamp) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.extend(readings);
        map.retain(|_, u| u.at >= before);
    }
}

/// How old a reading may be before it is not shown: three read periods.
pub fn max_age(period: Duration) -> SignedDuration {
    SignedDuration::try_from(period * 3).unwrap_or(SignedDuration::from_secs(30))
}

/// Where and how often to read the monitors.
#[derive(Debug, Clone)]
pub struct MonitorSource {
    pub namespace: Option<String>,
    pub selector: String,
    pub port: u16,
    pub period: Duration,
}

/// The value of a label in a Prometheus text-format series line.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let rest = &labels[start..];
    Some(&rest[..rest.find('"')?])
}

/// Per-card usage from a node monitor's `/metrics` text.
pub fn parse(text: &str, at: Timestamp) -> HashMap<String, CardUsage> {
    let mut out: HashMap<String, CardUsage> = HashMap::new();
    for line in text.lines() {
        let (series, is_memory) =
            if let Some(s) = line.strip_prefix("hami_host_gpu_memory_used_bytes{") {
                (s, true)
            } else if let Some(s) = line.strip_prefix("hami_host_gpu_utilization_ratio{") {
                (s, false)
            } else {
                continue;
            };
        let Some((labels, value)) = series.rsplit_once('}') else {
            continue;
        };
        let (Some(uuid), Ok(value)) = (
            label(labels, "device_uuid"),
            value.split_whitespace().next().unwrap_or("").parse::<f64>(),
        ) else {
            continue;
        };
        let card = out.entry(uuid.to_string()).or_insert(CardUsage {
            memory_mi_b: 0,
            utilization: 0.0,
            at,
        });
        if is_memory {
            card.memory_mi_b = (value / (1024.0 * 1024.0)).round() as u64;
        } else {
            card.utilization = value;
        }
    }
    out
}

/// GET `http://addr/metrics` (HTTP/1.0, the monitor's plain listener),
/// within `timeout`; the body.
async fn scrape(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        // A monitor's page is a few KiB per container; cap what is kept.
        s.take(16 << 20).read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
                Ok(body.to_string())
            }
            _ => Err(std::io::Error::other(format!(
                "unexpected answer: {}",
                text.lines().next().unwrap_or("")
            ))),
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))?
}

/// Reads the monitors every period, forever.
pub async fn run(client: kube::Client, source: MonitorSource, usage: LiveUsage) {
    let pods: Api<Pod> = match &source.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let params = ListParams::default()
        .labels(&source.selector)
        .fields("status.phase=Running");
    let mut tick = tokio::time::interval(source.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let list = match pods.list(&params).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing the node monitors");
                continue;
            }
        };
        let addrs: Vec<SocketAddr> = list
            .items
            .iter()
            .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
            .map(|ip| SocketAddr::new(ip, source.port))
            .collect();
        let reads = addrs
            .into_iter()
            .map(|a| async move { (a, scrape(a, source.period / 2).await) });
        let mut readings = HashMap::new();
        for (addr, r) in futures::future::join_all(reads).await {
            match r {
                Ok(text) => readings.extend(parse(&text, Timestamp::now())),
                Err(e) => tracing::debug!(%addr, error = %e, "node monitor not read"),
            }
        }
        usage.merge(readings, Timestamp::now() - max_age(source.period));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_series_give_each_cards_memory_and_utilisation() {
        let at = Timestamp::UNIX_EPOCH;
        let text = "\
# TYPE hami_host_gpu_memory_used_bytes gauge
hami_host_gpu_memory_used_bytes{device_index=\"0\",device_uuid=\"GPU-a\",device_type=\"T4\"} 314572800
hami_host_gpu_utilization_ratio{device_index=\"0\",device_uuid=\"GPU-a\",device_type=\"T4\"} 37
hami_host_gpu_memory_used_bytes{device_index=\"1\",device_uuid=\"GPU-b\",device_type=\"T4\"} 0
hami_vgpu_memory_used_bytes{namespace=\"n\",pod=\"p\",container=\"c\",vdevice_index=\"0\",device_uuid=\"GPU-a\"} 1
hami_host_gpu_utilization_ratio{device_uuid=\"GPU-c\"} not-a-number
";
        let u = parse(text, at);
        assert_eq!(u.len(), 2, "{u:?}");
        assert_eq!(u["GPU-a"].memory_mi_b, 300);
        assert_eq!(u["GPU-a"].utilization, 37.0);
        assert_eq!(u["GPU-b"].memory_mi_b, 0);
    }

    #[test]
    fn old_readings_are_not_shown() {
        let usage = LiveUsage::default();
        let at: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        usage.merge(
            parse(
                "hami_host_gpu_utilization_ratio{device_uuid=\"GPU-a\"} 5\n",
                at,
            ),
            at,
        );
        let max = SignedDuration::from_secs(30);
        assert!(
            usage
                .get("GPU-a", at + SignedDuration::from_secs(29), max)
                .is_some()
        );
        assert!(
            usage
                .get("GPU-a", at + SignedDuration::from_secs(31), max)
                .is_none()
        );
        assert!(usage.get("GPU-z", at, max).is_none());
        // A later round drops readings older than its cut-off.
        usage.merge(HashMap::new(), at + SignedDuration::from_secs(1));
        assert!(usage.get("GPU-a", at, max).is_none());
    }

    #[tokio::test]
    async fn a_monitor_is_read_over_http_and_a_silent_one_times_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhami_host_gpu_utilization_ratio{device_uuid=\"GPU-a\"} 9\n")
                .await
                .unwrap();
        });
        let body = scrape(addr, Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            parse(&body, Timestamp::UNIX_EPOCH)["GPU-a"].utilization,
            9.0
        );

        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let held = tokio::spawn(async move { silent.accept().await });
        let e = scrape(addr, Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        held.abort();
    }
}
