//! Load benchmark: N kwok nodes of G GPUs and P pods through the real
//! kube-scheduler and hami-scheduler. Prints end-to-end pods/s and Filter
//! and Bind latency quantiles from hami-scheduler's own histograms.
//!
//!   cargo run --release -p hami-e2e --bin hami-load -- \
//!       --scheduler target/release/hami-scheduler --nodes 1000 --pods 10000
//!
//! Needs the control-plane binaries of tests/e2e/build-k8s.sh.
//!
//! kwok has no device plugin, so by default this tool plays its part of the
//! bind protocol (spec section 3): when a pod is bound with
//! `bind-phase=allocating` it writes `bind-phase=success` and releases the
//! node lock, as a device plugin's Allocate does. `--no-plugin` leaves that
//! out; the lock is then freed only when kwok reports the pod Running.
//! `--lock-free` announces an allocation mode without the lock on every
//! node (`hami.io/node-allocation-mode: nri`, as hami-node does where the
//! runtime has NRI): binds take no node lock, and the stand-in writes only
//! `bind-phase=success`, as hami-node's NRI plugin does when it creates the
//! container.
//! `--baseline` creates plain pods (no GPU resources) that the default
//! scheduler places without hami: the control plane's own ceiling.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use serde_json::json;

use hami_e2e::GpuNode;

struct Opts {
    scheduler: String,
    nodes: usize,
    gpus: u32,
    pods: usize,
    policy: String,
    timeout: Duration,
    plugin: bool,
    lock_free: bool,
    baseline: bool,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        scheduler: "target/release/hami-scheduler".into(),
        nodes: 1000,
        gpus: 8,
        pods: 10_000,
        policy: "binpack".into(),
        timeout: Duration::from_secs(1800),
        plugin: true,
        lock_free: false,
        baseline: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--scheduler" => o.scheduler = v()?,
            "--nodes" => o.nodes = v()?.parse().map_err(|e| format!("--nodes: {e}"))?,
            "--gpus" => o.gpus = v()?.parse().map_err(|e| format!("--gpus: {e}"))?,
            "--pods" => o.pods = v()?.parse().map_err(|e| format!("--pods: {e}"))?,
            "--node-policy" => o.policy = v()?,
            "--no-plugin" => o.plugin = false,
            "--lock-free" => o.lock_free = true,
            "--baseline" => o.baseline = true,
            "--timeout-secs" => {
                o.timeout =
                    Duration::from_secs(v()?.parse().map_err(|e| format!("--timeout-secs: {e}"))?)
            }
            "-h" | "--help" => {
                return Err("usage: hami-load [--scheduler PATH] [--nodes N] [--gpus G] [--pods P] [--node-policy binpack|spread] [--timeout-secs S] [--no-plugin] [--lock-free] [--baseline]".into());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

/// Plays the device plugin's Allocate for every bound pod of `namespace`.
async fn device_plugin(
    client: kube::Client,
    namespace: String,
    nodes: usize,
    lock_free: bool,
    latencies: std::sync::Arc<std::sync::Mutex<Vec<f64>>>,
) {
    let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let stream = watcher::watcher(api.clone(), watcher::Config::default());
    let mut stream = std::pin::pin!(stream);
    let mut done: HashSet<String> = HashSet::new();
    // Every node has its own plugin, so allocations on different nodes run
    // side by side: one slot per node. (A cap of 64 made this stand-in the
    // bottleneck once node writes took ~1 s under load.)
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(nodes.max(1)));
    while let Some(ev) = stream.next().await {
        let Ok(Event::Apply(p) | Event::InitApply(p)) = ev else {
            continue;
        };
        let name = p.metadata.name.clone().unwrap_or_default();
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        let allocating = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("hami.io/bind-phase"))
            .is_some_and(|v| v == "allocating");
        if !allocating || !done.insert(name.clone()) {
            continue;
        }
        let (client, api, ns) = (client.clone(), api.clone(), namespace.clone());
        let slots = slots.clone();
        let latencies = latencies.clone();
        let seen = Instant::now();
        tokio::spawn(async move {
            let Ok(_slot) = slots.acquire().await else {
                return;
            };
            // Lock-free, hami-node's one patch also writes the node label
            // (hami-scheduler then does not).
            let patch = if lock_free {
                json!({"metadata": {
                    "annotations": {"hami.io/bind-phase": "success"},
                    "labels": {"hami.io/vgpu-node": node},
                }})
            } else {
                json!({"metadata": {"annotations": {"hami.io/bind-phase": "success"}}})
            };
            for attempt in 0..5u64 {
                let r = api
                    .patch(&name, &Default::default(), &kube::api::Patch::Merge(&patch))
                    .await;
                match r {
                    Ok(_) => break,
                    Err(e) if attempt == 4 => eprintln!("plugin: {name}: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200 << attempt)).await,
                }
            }
            for attempt in 0..5u64 {
                if lock_free {
                    break;
                }
                match hami_kube::lock::release(&client, &node, &ns, &name).await {
                    Ok(()) => break,
                    Err(e) if attempt == 4 => eprintln!("plugin: unlock {node}: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200 << attempt)).await,
                }
            }
            latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(seen.elapsed().as_secs_f64());
        });
    }
}

/// CPU seconds used so far by each process this one started (and by this
/// one), keyed by command name: where the machine's time goes in a run.
fn cpu_by_component() -> std::collections::BTreeMap<String, f64> {
    let me = std::process::id();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut parent: std::collections::HashMap<u32, (u32, String, f64)> = Default::default();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ... utime(14) stime(15)`; comm may hold spaces.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let field = |i: usize| {
            rest.get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let ppid = field(1) as u32;
        parent.insert(pid, (ppid, comm, (field(11) + field(12)) / hz));
    }
    let mut out = std::collections::BTreeMap::new();
    for (&pid, (_, comm, cpu)) in &parent {
        let mut p = pid;
        let mine = loop {
            if p == me {
                break true;
            }
            match parent.get(&p) {
                Some((pp, _, _)) if *pp != 0 && *pp != p => p = *pp,
                _ => break false,
            }
        };
        if mine {
            *out.entry(comm.clone()).or_insert(0.0) += cpu;
        }
    }
    out
}

/// Prints what the API server was asked, per verb and resource, from its
/// `apiserver_request_total` counter: where the load of a run went.
async fn api_server_requests(client: &kube::Client, pods: usize) {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("a valid request");
    let Ok(text) = client.request_text(req).await else {
        eprintln!("kube-apiserver /metrics not readable; no request breakdown");
        return;
    };
    let mut counts: std::collections::BTreeMap<String, f64> = Default::default();
    let mut seconds: std::collections::BTreeMap<String, f64> = Default::default();
    for line in text.lines() {
        let (rest, into_seconds) = if let Some(r) = line.strip_prefix("apiserver_request_total{") {
            (r, false)
        } else if let Some(r) = line.strip_prefix("apiserver_request_duration_seconds_sum{") {
            (r, true)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        if label("verb") == "WATCH" {
            continue;
        }
        let sub = label("subresource");
        let resource = format!(
            "{} {}{}{}",
            label("verb"),
            label("resource"),
            if sub.is_empty() { "" } else { "/" },
            sub,
        );
        let v = value.trim().parse::<f64>().unwrap_or(0.0);
        if into_seconds {
            *seconds.entry(resource).or_default() += v;
        } else {
            *counts
                .entry(format!("{resource} {}", label("code")))
                .or_default() += v;
        }
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    eprintln!("API requests since start (per pod = / {pods}; mean latency over all codes):");
    for (k, n) in v.iter().take(15) {
        let resource = k.rsplit_once(' ').map_or(k.as_str(), |(r, _)| r);
        let total: f64 = v
            .iter()
            .filter(|(k2, _)| k2.rsplit_once(' ').is_some_and(|(r, _)| r == resource))
            .map(|(_, n)| n)
            .sum();
        let mean_ms = seconds.get(resource).copied().unwrap_or(0.0) / total.max(1.0) * 1000.0;
        eprintln!(
            "  {n:>9.0}  {:>6.2}/pod  {mean_ms:>7.1} ms  {k}",
            n / pods as f64
        );
    }
}

/// `histogram_quantile` over cumulative buckets `(le, count)`.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in buckets {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let width = le - prev.0;
            let inside = c - prev.1;
            let frac = if inside > 0.0 {
                (rank - prev.1) / inside
            } else {
                1.0
            };
            return Some(prev.0 + width * frac);
        }
        prev = (le, c);
    }
    None
}

fn buckets(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut v: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let Some(cluster) = hami_e2e::cluster(&o.scheduler) else {
        std::process::exit(2);
    };
    let mut ns = cluster.namespace("load").await;
    let t = Instant::now();
    let specs: Vec<GpuNode> = (0..o.nodes)
        .map(|i| {
            let mut n = GpuNode::new(&format!("n{i:04}"), o.gpus, 81920, "NVIDIA A100-SXM4-80GB");
            n.allocation_mode = o.lock_free.then(|| "nri".to_string());
            n
        })
        .collect();
    for s in &specs {
        ns.add_node(s).await;
    }
    eprintln!("{} nodes created in {:?}", o.nodes, t.elapsed());
    // Let the caches catch up before the clock starts.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let api: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let watch_api = api.clone();
    let allocate_latency = std::sync::Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let plugin_task = o.plugin.then(|| {
        tokio::spawn(device_plugin(
            ns.client.clone(),
            ns.name.clone(),
            o.nodes,
            o.lock_free,
            allocate_latency.clone(),
        ))
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let running_lag = std::sync::Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let lag = running_lag.clone();
    let watcher_task = tokio::spawn(async move {
        let mut bound: HashSet<String> = HashSet::new();
        let mut bound_at: std::collections::HashMap<String, Instant> = Default::default();
        let stream = watcher::watcher(watch_api, watcher::Config::default());
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let pods: Vec<Pod> = match ev {
                Ok(Event::Apply(p) | Event::InitApply(p)) => vec![p],
                _ => continue,
            };
            for p in pods {
                let name = p.metadata.name.clone().unwrap_or_default();
                if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
                    && bound.insert(name.clone())
                {
                    bound_at.insert(name.clone(), Instant::now());
                    let _ = tx.send(Instant::now());
                }
                let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                if running && let Some(t) = bound_at.remove(&name) {
                    lag.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(t.elapsed().as_secs_f64());
                }
            }
        }
    });
    let cpu_before = cpu_by_component();
    let start = Instant::now();
    let policy = o.policy.clone();
    let baseline = o.baseline;
    let creates = futures::stream::iter(0..o.pods)
        .map(|i| {
            let pod = if baseline {
                ns.gpu_pod(&format!("p{i:05}"), json!({"cpu": "100m"}), json!({}))
            } else {
                ns.gpu_pod(
                    &format!("p{i:05}"),
                    json!({"nvidia.com/gpu": "1", "nvidia.com/gpumem": "4000", "nvidia.com/gpucores": "5"}),
                    json!({"hami.io/node-scheduler-policy": policy}),
                )
            };
            ns.create_pod(pod)
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>();
    let results = creates.await;
    let failed_creates = results.iter().filter(|r| r.is_err()).count();
    let create_secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{} pods created in {create_secs:.1} s ({failed_creates} failed)",
        o.pods
    );
    let mut bound = 0usize;
    let mut last = start;
    while bound < o.pods - failed_creates {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(at)) => {
                bound += 1;
                last = at;
                if bound.is_multiple_of(1000) {
                    eprintln!("{bound} bound after {:.1} s", start.elapsed().as_secs_f64());
                }
            }
            _ => break,
        }
        if start.elapsed() > o.timeout {
            break;
        }
    }
    let cpu_after = cpu_by_component();
    let window = last.duration_since(start).as_secs_f64().max(1e-9);
    eprintln!(
        "CPU seconds from the first create to the end of the wait (cores busy = seconds / run):"
    );
    let mut used: Vec<(String, f64)> = cpu_after
        .iter()
        .map(|(k, v)| (k.clone(), v - cpu_before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.05)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (comm, secs) in used {
        eprintln!("  {comm:<16} {secs:8.1} s  {:5.2} cores", secs / window);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    watcher_task.abort();
    if let Some(t) = plugin_task {
        t.abort();
    }
    for (what, samples) in [
        ("bound -> Running (kwok)", &running_lag),
        (
            if o.lock_free {
                "allocating seen -> bind-phase success (plugin)"
            } else {
                "allocating seen -> lock released (plugin)"
            },
            &allocate_latency,
        ),
    ] {
        let mut l = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
        l.sort_by(f64::total_cmp);
        if !l.is_empty() {
            eprintln!(
                "{what}: p50 {:.0} ms, p99 {:.0} ms over {} pods",
                l[l.len() / 2] * 1000.0,
                l[(l.len() * 99 / 100).min(l.len() - 1)] * 1000.0,
                l.len()
            );
        }
    }
    let secs = last.duration_since(start).as_secs_f64();
    api_server_requests(&ns.client, o.pods).await;
    let metrics = cluster.scheduler_get("/metrics").await.unwrap_or_default();
    let f = buckets(&metrics, "hami_scheduler_filter_duration_seconds");
    let b = buckets(&metrics, "hami_scheduler_bind_duration_seconds");
    // kube-scheduler gives up on a bind after its extender httpTimeout
    // (30 s here); the histogram's last bucket below that is 26.2 s.
    let total_binds = b.last().map_or(0.0, |x| x.1);
    let (le, under) = b
        .iter()
        .rev()
        .find(|(le, _)| *le < 30.0)
        .copied()
        .unwrap_or((0.0, 0.0));
    eprintln!(
        "binds longer than {le:.1} s (kube-scheduler's timeout is 30 s): {}",
        total_binds - under
    );
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{:.2}", s * 1000.0));
    println!(
        "| nodes x GPUs | pods | path | bound | seconds | pods/s | filter p50 ms | filter p99 ms | bind p50 ms | bind p99 ms | filter calls | bind calls |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} x {} | {} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} |",
        o.nodes,
        o.gpus,
        o.pods,
        if o.baseline {
            "plain pods (baseline)".to_string()
        } else {
            format!(
                "{}, {}",
                o.policy,
                if o.lock_free {
                    "lock-free"
                } else {
                    "node lock"
                }
            )
        },
        bound,
        secs,
        bound as f64 / secs.max(1e-9),
        ms(quantile(0.5, &f)),
        ms(quantile(0.99, &f)),
        ms(quantile(0.5, &b)),
        ms(quantile(0.99, &b)),
        f.last().map_or(0.0, |x| x.1),
        b.last().map_or(0.0, |x| x.1),
    );
    drop(ns);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let b = [
            (0.001, 50.0),
            (0.002, 90.0),
            (0.004, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert!((quantile(0.5, &b).unwrap() - 0.001).abs() < 1e-12);
        assert!((quantile(0.7, &b).unwrap() - 0.0015).abs() < 1e-12);
        assert!((quantile(0.99, &b).unwrap() - 0.0038).abs() < 1e-12);
        assert_eq!(quantile(0.5, &[]), None);
        let text = "x_bucket{le=\"0.001\"} 3\nx_bucket{le=\"+Inf\"} 4\nx_count 4\n";
        assert_eq!(buckets(text, "x"), vec![(0.001, 3.0), (f64::INFINITY, 4.0)]);
    }
}
