//! Wiring: the client, the watches that feed the cluster state, the
//! periodic resync (handshakes, expired reservations, stuck binds), leader
//! election and the servers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use jiff::SignedDuration;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use hami_api::annotations as ann;
use hami_api::config::DeviceConfig;
use hami_kube::cache::{self, Change, Synced};
use hami_kube::clock::{Clock, SystemClock};
use hami_kube::events::{EventWriter, Severity};
use hami_kube::leader::{self, Leadership, LeaseConfig};
use hami_kube::lock::{self, LockPolicy};
use hami_kube::pod as podio;
use hami_sched::{AdmissionOptions, Engine, Policies, pod_key};

use crate::app::{self, App};
use crate::config::{Args, ProtectedEnvMode, Settings};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::state::Cluster;
use crate::tls;

/// Loads the device config named in the settings (defaults when none).
pub fn load_engine(s: &Settings) -> Result<Engine, Error> {
    let config = match &s.device_config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            let (config, warnings) = DeviceConfig::from_yaml(&path.display().to_string(), &text)?;
            for w in warnings {
                tracing::warn!("{w}");
            }
            config
        }
        None => DeviceConfig::default(),
    };
    let admission = AdmissionOptions {
        force_overwrite_default_scheduler: s.force_overwrite_default_scheduler,
        protected_env_mode: match s.protected_env {
            ProtectedEnvMode::Deny => hami_sched::ProtectedEnvMode::Deny,
            ProtectedEnvMode::Remove => hami_sched::ProtectedEnvMode::Remove,
        },
        protected_env_namespaces: s.protected_env_allowed_namespaces.clone(),
    };
    Ok(Engine::from_config(
        &config,
        Policies {
            node: s.node_policy,
            gpu: s.gpu_policy,
        },
    )
    .with_admission(admission))
}

/// Runs the scheduler until SIGTERM or Ctrl-C, or until a background task
/// dies (then with an error, so the pod restarts rather than serving from a
/// cache that no longer follows the API server).
pub async fn run(args: Args) -> Result<(), Error> {
    let s = args.settings().map_err(Error::Config)?;
    for note in args.hami.notes() {
        tracing::info!("{note}");
    }
    let (Some(cert), Some(key)) = (&s.tls_cert_file, &s.tls_key_file) else {
        return Err(Error::Config(
            "--tls-cert-file and --tls-key-file are required (kube-apiserver only calls webhooks over HTTPS)".into(),
        ));
    };
    hami_kube::client::install_crypto_provider();
    let tls_config = tls::server_config(cert, key, s.extender_client_ca_file.as_deref())?;
    let engine = Arc::new(load_engine(&s)?);
    let client = hami_kube::client::connect(s.kubeconfig.as_deref()).await?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let mut supervised: Vec<(&'static str, tokio::task::JoinHandle<()>)> = Vec::new();
    let leadership = if s.leader_elect {
        let (l, task) = leader::follow(
            client.clone(),
            LeaseConfig {
                namespace: s.leader_elect_resource_namespace.clone(),
                name: s.leader_elect_resource_name.clone(),
                identity: s.leader_elect_identity.clone(),
            },
        );
        tracing::info!(
            lease = format!(
                "{}/{}",
                s.leader_elect_resource_namespace, s.leader_elect_resource_name
            ),
            identity = s.leader_elect_identity,
            "following kube-scheduler's leader election"
        );
        supervised.push(("leader Lease watch", task));
        l
    } else {
        Leadership::always()
    };
    let lock_policy = lock_policy(&s)?;
    let app = App {
        engine,
        cluster: Arc::new(std::sync::Mutex::new(Cluster::default())),
        client: client.clone(),
        events: EventWriter::new(client.clone(), &s.scheduler_name, &s.leader_elect_identity),
        clock,
        leadership,
        synced: Synced::default(),
        metrics: Metrics::default(),
        lock_policy,
        lock_busy_after: SignedDuration::from_secs(5),
        scheduler_name: s.scheduler_name.clone(),
        node_gates: Default::default(),
        bind_slots: Arc::new(tokio::sync::Semaphore::new(s.max_concurrent_binds)),
        failed: Default::default(),
        bind_flights: Default::default(),
        requeue: Default::default(),
        usage: Default::default(),
        usage_max_age: crate::usage::max_age(s.node_monitor_period),
    };
    if let Some(selector) = &s.node_monitor_selector {
        tokio::spawn(crate::usage::run(
            client.clone(),
            crate::usage::MonitorSource {
                namespace: s.node_monitor_namespace.clone(),
                selector: selector.clone(),
                port: s.node_monitor_port,
                period: s.node_monitor_period,
            },
            app.usage.clone(),
        ));
    }

    let nodes_synced = Arc::new(AtomicBool::new(false));
    let pods_synced = Arc::new(AtomicBool::new(false));
    supervised.push((
        "node watch",
        tokio::spawn(watch_nodes(
            app.clone(),
            s.node_label_selector.clone(),
            nodes_synced.clone(),
            pods_synced.clone(),
        )),
    ));
    supervised.push((
        "pod watch",
        tokio::spawn(watch_pods(app.clone(), pods_synced, nodes_synced)),
    ));
    supervised.push(("resync", tokio::spawn(resync(app.clone(), s.clone()))));

    let listener = tokio::net::TcpListener::bind(s.bind_address)
        .await
        .map_err(|source| Error::Listen {
            addr: s.bind_address,
            source,
        })?;
    tracing::info!(address = %s.bind_address, "serving HTTPS");
    let router = app::router(app.clone(), s.max_body_bytes);
    let limits = tls::ServeLimits {
        max_connections: s.max_connections,
        handshake_timeout: s.tls_handshake_timeout,
        body_timeout: s.request_body_timeout,
    };
    supervised.push((
        "HTTPS server",
        tokio::spawn(tls::serve_tls(listener, tls_config, router, limits)),
    ));
    if let Some(addr) = s.dashboard_bind_address {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen { addr, source })?;
        tracing::info!(address = %addr, "serving the dashboard at /ui over HTTP");
        let r = crate::dashboard::router().with_state(app.clone());
        supervised.push((
            "dashboard server",
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, r).await {
                    tracing::error!(error = %e, "dashboard server");
                }
            }),
        ));
    }
    if let Some(addr) = s.metrics_bind_address {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen { addr, source })?;
        tracing::info!(address = %addr, "serving metrics over HTTP");
        let r = app::observability().with_state(app.clone());
        supervised.push((
            "metrics server",
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, r).await {
                    tracing::error!(error = %e, "metrics server");
                }
            }),
        ));
    }

    let (names, mut handles): (Vec<_>, Vec<_>) = supervised.into_iter().unzip();
    let died = async {
        let (ended, index, _) = futures::future::select_all(handles.iter_mut()).await;
        (names[index], ended)
    };
    let outcome = tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
        (what, ended) = died => {
            let why = match ended {
                Err(e) if e.is_panic() => format!("{what} panicked"),
                _ => format!("{what} stopped"),
            };
            // Not ready from now on; the exit code tells the kubelet.
            app.failed.set(why.clone());
            tracing::error!("{why}; exiting");
            Err(Error::Config(why))
        }
    };
    for h in &handles {
        h.abort();
    }
    outcome
}

/// The node lock rules from the settings. A holder still binding is not
/// taken over before its bind could have ended: it waits for a lock up to
/// lock wait, and kube-scheduler may retry only after its httpTimeout.
pub fn lock_policy(s: &Settings) -> Result<LockPolicy, Error> {
    let signed = |d: std::time::Duration, what: &str| {
        SignedDuration::try_from(d).map_err(|e| Error::Config(format!("{what}: {e}")))
    };
    let bind_time = s
        .lock_wait
        .checked_add(s.extender_http_timeout)
        .ok_or_else(|| Error::Config("--lock-wait + --extender-http-timeout overflows".into()))?;
    let bind_grace = signed(bind_time, "--lock-wait")?;
    let expiry = signed(s.lock_timeout, "--lock-timeout")?;
    if expiry < bind_grace {
        return Err(Error::Config(format!(
            "--lock-timeout ({}s) must be at least --lock-wait + --extender-http-timeout ({}s): a lock must not expire while its holder may still be binding",
            s.lock_timeout.as_secs_f64(),
            bind_grace.as_secs_f64()
        )));
    }
    Ok(LockPolicy {
        expiry,
        wait: s.lock_wait,
        bind_grace,
        ..LockPolicy::default()
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn mark_ready(app: &App, mine: &AtomicBool, other: &AtomicBool) {
    mine.store(true, Ordering::Release);
    if other.load(Ordering::Acquire) && !app.synced.get() {
        app.synced.set();
        tracing::info!("node and pod caches synced; ready");
    }
}

async fn watch_nodes(
    app: App,
    selector: Option<String>,
    synced: Arc<AtomicBool>,
    other: Arc<AtomicBool>,
) {
    let stream = cache::watch(Api::<Node>::all(app.client.clone()), selector.as_deref());
    let mut stream = std::pin::pin!(stream);
    while let Some(change) = stream.next().await {
        let now = app.clock.now();
        {
            let mut c = app.cluster();
            match change {
                Change::Restart => c.nodes_restart(),
                // Handshake answers are written by the resync only: the
                // agent answers each Requesting as it sees it, so answering
                // each Reported as it comes would make the two ping-pong
                // writes without pause (HAMi's scheduler paces them too).
                Change::Upsert(node) => {
                    let _ = c.upsert_node(&app.engine, node, now);
                }
                Change::Delete(node) => c.delete_node(&node.name_any()),
                Change::Synced => {
                    c.nodes_synced();
                    drop(c);
                    mark_ready(&app, &synced, &other);
                }
            }
        }
    }
}

async fn watch_pods(app: App, synced: Arc<AtomicBool>, other: Arc<AtomicBool>) {
    let stream = cache::watch(Api::<Pod>::all(app.client.clone()), None);
    let mut stream = std::pin::pin!(stream);
    while let Some(change) = stream.next().await {
        let mut c = app.cluster();
        match change {
            Change::Restart => c.pods_restart(),
            Change::Upsert(pod) => c.upsert_pod(&app.engine, &pod),
            Change::Delete(pod) => c.delete_pod(&pod_key(&pod)),
            Change::Synced => {
                c.pods_synced();
                drop(c);
                mark_ready(&app, &synced, &other);
            }
        }
    }
}

/// Writes handshake answers (leader only), off the watch loop.
fn write_handshakes(app: &App, answers: Vec<(String, String, String)>) {
    if answers.is_empty() || !app.leadership.is_leader() {
        return;
    }
    // Each answer is written only over the handshake it answers (a JSON
    // patch `test`): an agent that removed its annotations meanwhile (it
    // is being uninstalled) or wrote a newer one is not overwritten.
    let answers: Vec<(String, String, String, String)> = {
        let c = app.cluster();
        answers
            .into_iter()
            .filter_map(|(node, key, value)| {
                let seen = c.handshake_of(&node, &key)?;
                Some((node, key, seen, value))
            })
            .collect()
    };
    let client = app.client.clone();
    tokio::spawn(async move {
        let nodes: Api<Node> = Api::all(client);
        for (node, key, seen, value) in answers {
            let path = format!(
                "/metadata/annotations/{}",
                key.replace('~', "~0").replace('/', "~1")
            );
            let ops = json!([
                {"op": "test", "path": path, "value": seen},
                {"op": "replace", "path": path, "value": value},
            ]);
            let patch: json_patch::Patch = serde_json::from_value(ops).expect("a valid JSON patch");
            match nodes
                .patch(&node, &PatchParams::default(), &Patch::<()>::Json(patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 422 => {
                    tracing::debug!(
                        node,
                        key,
                        "handshake changed before the answer; not written"
                    );
                }
                Err(e) => tracing::warn!(node, key, error = %e, "writing the handshake"),
            }
        }
    });
}

/// Every resync period: re-judge handshakes, drop reservations no bind
/// followed, and give up on binds whose device plugin never answered.
async fn resync(app: App, s: Settings) {
    let timeout =
        SignedDuration::try_from(s.allocating_timeout).unwrap_or(SignedDuration::from_mins(2));
    let mut tick = tokio::time::interval(s.resync_period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !app.synced.get() {
            continue;
        }
        let now = app.clock.now();
        let (answers, expired, stuck) = {
            let mut c = app.cluster();
            let answers = c.rejudge_nodes(&app.engine, now);
            let expired = c.expire_reservations(now, timeout);
            let stuck = c.stuck_allocating(now, timeout);
            (answers, expired, stuck)
        };
        for (key, node) in expired {
            tracing::info!(
                pod = key,
                node,
                "released a Filter decision no bind followed"
            );
            if app.leadership.is_leader() {
                app.requeue.cards_freed(&app.client, &node, now);
            }
        }
        write_handshakes(&app, answers);
        if !app.leadership.is_leader() {
            continue;
        }
        for p in stuck {
            give_up_on(&app, &p, s.allocating_timeout).await;
        }
    }
}

async fn give_up_on(app: &App, p: &crate::state::StuckPod, timeout: std::time::Duration) {
    let key = format!("{}/{}", p.namespace, p.name);
    let mut annotations = BTreeMap::new();
    annotations.insert(ann::BIND_PHASE.to_string(), Some("failed".to_string()));
    match podio::patch_metadata(
        &app.client,
        &p.namespace,
        &p.name,
        p.uid.as_deref(),
        &annotations,
        &BTreeMap::new(),
    )
    .await
    {
        Ok(pod) => {
            app.cluster().give_up(&key);
            if !p.node.is_empty()
                && let Err(e) = lock::release(&app.client, &p.node, &p.namespace, &p.name).await
            {
                tracing::warn!(pod = key, error = %e, "releasing the node lock of a stuck pod");
            }
            let msg = format!(
                "no device plugin took the allocation on node {} within {}s; bind-phase set to failed and the devices released",
                p.node,
                timeout.as_secs()
            );
            tracing::warn!(pod = key, "{msg}");
            if let Err(e) = app
                .events
                .pod_event(
                    &pod,
                    Severity::Warning,
                    "AllocationTimeout",
                    &msg,
                    app.clock.as_ref(),
                )
                .await
            {
                tracing::warn!(error = %e, "writing AllocationTimeout event");
            }
        }
        Err(e) => tracing::warn!(pod = key, error = %e, "marking a stuck pod failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn admission_flags_reach_the_engine() {
        let s = Args::parse_from([
            "hami-scheduler",
            "--force-overwrite-default-scheduler=false",
            "--protected-env=remove",
            "--protected-env-allowed-namespaces=debug,ops",
        ])
        .settings()
        .unwrap();
        let engine = load_engine(&s).unwrap();
        assert_eq!(
            engine.admission,
            AdmissionOptions {
                force_overwrite_default_scheduler: false,
                protected_env_mode: hami_sched::ProtectedEnvMode::Remove,
                protected_env_namespaces: vec!["debug".into(), "ops".into()],
            }
        );
        let defaults =
            load_engine(&Args::parse_from(["hami-scheduler"]).settings().unwrap()).unwrap();
        assert_eq!(defaults.admission, AdmissionOptions::default());
    }

    #[test]
    fn a_lock_timeout_shorter_than_a_bind_is_refused() {
        let s = Args::parse_from(["hami-scheduler", "--lock-timeout=30s"])
            .settings()
            .unwrap();
        let e = lock_policy(&s).unwrap_err().to_string();
        assert!(e.contains("--lock-timeout"), "{e}");
        let p = lock_policy(&Args::parse_from(["hami-scheduler"]).settings().unwrap()).unwrap();
        assert_eq!(p.bind_grace, SignedDuration::from_secs(50));
    }
}
