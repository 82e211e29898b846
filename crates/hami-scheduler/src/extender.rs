//! kube-scheduler's extender v1 wire types (`k8s.io/kube-scheduler/
//! extender/v1`: Go structs without JSON tags, so PascalCase field names)
//! and the Filter and Bind handlers: decode request -> engine -> encode.

use std::collections::BTreeMap;
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use hami_kube::events::Severity;
use hami_kube::{lock, pod as podio};

use crate::app::App;
use crate::state::bind_annotations;

/// ExtenderArgs: the pod and the candidate nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderArgs {
    pub pod: Option<Pod>,
    /// Whole Node objects (only when the extender is not node-cache-capable).
    #[serde(default)]
    pub nodes: Option<Value>,
    /// Node names (node-cache-capable extenders, ours).
    #[serde(default)]
    pub node_names: Option<Vec<String>>,
}

/// ExtenderFilterResult.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderFilterResult {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub nodes: Option<Value>,
    #[serde(default)]
    pub node_names: Option<Vec<String>>,
    #[serde(default)]
    pub failed_nodes: BTreeMap<String, String>,
    #[serde(default)]
    pub failed_and_unresolvable_nodes: BTreeMap<String, String>,
    #[serde(default)]
    pub error: String,
}

/// ExtenderBindingArgs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderBindingArgs {
    pub pod_name: String,
    pub pod_namespace: String,
    #[serde(rename = "PodUID", default)]
    pub pod_uid: String,
    pub node: String,
}

/// ExtenderBindingResult.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ExtenderBindingResult {
    #[serde(default)]
    pub error: String,
}

fn node_names_of(nodes: &Value) -> Vec<String> {
    nodes
        .get("items")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|n| n.pointer("/metadata/name").and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn keep_nodes(nodes: &Value, keep: &[String]) -> Value {
    let mut out = nodes.clone();
    if let Some(items) = out.get_mut("items").and_then(Value::as_array_mut) {
        items.retain(|n| {
            n.pointer("/metadata/name")
                .and_then(Value::as_str)
                .is_some_and(|name| keep.iter().any(|k| k == name))
        });
    }
    out
}

/// POST /filter.
pub async fn filter(app: &App, args: ExtenderArgs) -> ExtenderFilterResult {
    let started = Instant::now();
    let result = filter_inner(app, args).await;
    app.metrics
        .filter_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn filter_inner(app: &App, args: ExtenderArgs) -> ExtenderFilterResult {
    if !app.synced.get() {
        // Deciding on half a cache could give away a slice that is taken.
        return ExtenderFilterResult {
            error: "hami-scheduler is starting: node and pod caches not synced yet".into(),
            ..Default::default()
        };
    }
    let Some(pod) = args.pod else {
        return ExtenderFilterResult {
            error: "ExtenderArgs.Pod is missing".into(),
            ..Default::default()
        };
    };
    let candidates = match (&args.node_names, &args.nodes) {
        (Some(names), _) => names.clone(),
        (None, Some(nodes)) => node_names_of(nodes),
        (None, None) => Vec::new(),
    };
    let refuse_all = |msg: String| ExtenderFilterResult {
        node_names: Some(Vec::new()),
        nodes: args.nodes.as_ref().map(|n| keep_nodes(n, &[])),
        failed_and_unresolvable_nodes: candidates
            .iter()
            .map(|n| (n.clone(), msg.clone()))
            .collect(),
        ..Default::default()
    };
    if let Some(other) = foreign_scheduler(&pod, &app.scheduler_name) {
        // Reserving for a pod another scheduler owns would hold cards for
        // nothing (or for whoever invents such calls).
        return refuse_all(other);
    }
    let answer = |names: Vec<String>| ExtenderFilterResult {
        nodes: args.nodes.as_ref().map(|n| keep_nodes(n, &names)),
        node_names: Some(names),
        ..Default::default()
    };
    let req = match app.engine.prepare(&pod) {
        // Not ours: every candidate stays.
        Ok(None) => return answer(candidates),
        Ok(Some(r)) => r,
        // No node can ever take it; say why on each.
        Err(e) => return refuse_all(e.to_string()),
    };
    let now = app.clock.now();
    let outcome = {
        let mut c = app.cluster();
        c.filter_avoiding_busy(
            &app.engine,
            &req,
            pod.metadata.uid.as_deref(),
            &candidates,
            now,
            app.lock_busy_after,
        )
    };
    if let Some(freed) = &outcome.freed
        && app.leadership.is_leader()
    {
        app.requeue.cards_freed(&app.client, freed, now);
    }
    match outcome.node {
        Some(node) => {
            tracing::debug!(pod = req.key, node, "filter");
            let mut r = answer(vec![node]);
            r.failed_nodes = outcome.failed;
            r
        }
        None => {
            tracing::info!(pod = req.key, "no node fits");
            let mut lines: Vec<String> = outcome
                .failed
                .iter()
                .map(|(n, why)| format!("{n}: {why}"))
                .collect();
            if lines.is_empty() {
                lines.push("no candidate node has GPUs registered".into());
            }
            let message = format!("no node fits: {}", lines.join("; "));
            if app.leadership.is_leader() {
                let app2 = app.clone();
                tokio::spawn(async move {
                    if let Err(e) = app2
                        .events
                        .pod_event(
                            &pod,
                            Severity::Warning,
                            "FilteringFailed",
                            &message,
                            app2.clock.as_ref(),
                        )
                        .await
                    {
                        tracing::warn!(error = %e, "writing FilteringFailed event");
                    }
                });
            }
            let mut r = answer(Vec::new());
            r.failed_nodes = outcome.failed;
            r
        }
    }
}

/// Why a pod is not ours to place: its schedulerName names another
/// scheduler. `None` when it is ours.
fn foreign_scheduler(pod: &Pod, ours: &str) -> Option<String> {
    let name = pod
        .spec
        .as_ref()
        .and_then(|s| s.scheduler_name.as_deref())
        .unwrap_or("default-scheduler");
    (name != ours).then(|| {
        format!("pod's schedulerName is {name:?}; this extender places only pods of {ours:?}")
    })
}

/// POST /bind.
pub async fn bind(app: &App, args: ExtenderBindingArgs) -> ExtenderBindingResult {
    let started = Instant::now();
    // With the uid: a pod re-created under the same name is another bind.
    let key = format!("{}/{}/{}", args.pod_namespace, args.pod_name, args.pod_uid);
    let flight = match app.bind_flights.start(&key, &args.node) {
        Ok(f) => f,
        Err((node, rx)) => return join_flight(app, &args, &node, rx, started).await,
    };
    let Ok(slot) = app.bind_slots.clone().try_acquire_owned() else {
        let result = Err(
            "too many binds in flight in this hami-scheduler (--max-concurrent-binds); try again"
                .to_string(),
        );
        flight.finish(&result);
        return finish_bind(app, &args, result, started);
    };
    // Run the bind to its end even if kube-scheduler hangs up: stopping
    // between the lock and the binding would leave the node locked by a
    // pod that is never bound. The task owns the flight, so a retry joins
    // it for as long as it runs.
    let task = {
        let (app, args) = (app.clone(), args.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let result = bind_inner(&app, &args).await;
            flight.finish(&result);
            result
        })
    };
    let result = task
        .await
        .unwrap_or_else(|e| Err(format!("bind task failed: {e}")));
    finish_bind(app, &args, result, started)
}

/// A Bind of a pod whose bind is already running (kube-scheduler retried
/// after its httpTimeout): the running one's outcome is the answer.
async fn join_flight(
    app: &App,
    args: &ExtenderBindingArgs,
    node: &str,
    mut rx: tokio::sync::watch::Receiver<crate::app::BindOutcome>,
    started: Instant,
) -> ExtenderBindingResult {
    let result = if node != args.node {
        Err(format!(
            "a bind of this pod to node {node} is still running; not binding it to {}",
            args.node
        ))
    } else {
        match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or(Ok(())),
            Err(_) => Err("the running bind of this pod ended without an outcome".into()),
        }
    };
    finish_bind(app, args, result, started)
}

fn finish_bind(
    app: &App,
    args: &ExtenderBindingArgs,
    result: Result<(), String>,
    started: Instant,
) -> ExtenderBindingResult {
    app.metrics
        .bind_duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => ExtenderBindingResult::default(),
        Err(error) => {
            tracing::warn!(
                pod = format!("{}/{}", args.pod_namespace, args.pod_name),
                node = args.node,
                error,
                "bind failed"
            );
            ExtenderBindingResult { error }
        }
    }
}

/// Why this replica must not bind now (it does not lead, or cannot tell);
/// `None` when it leads.
async fn not_leading(app: &App) -> Option<String> {
    match app.leadership.confirm().await {
        Ok(true) => None,
        Ok(false) => Some(format!(
            "this hami-scheduler replica is not the leader (kube-scheduler's Lease is held by {})",
            app.leadership.holder().unwrap_or_else(|| "nobody".into())
        )),
        Err(e) => Some(format!("cannot tell whether this replica leads: {e}")),
    }
}

async fn bind_inner(app: &App, args: &ExtenderBindingArgs) -> Result<(), String> {
    if let Some(why) = not_leading(app).await {
        return Err(why);
    }
    if !app.synced.get() {
        return Err("hami-scheduler is starting: node and pod caches not synced yet".into());
    }
    let (ns, name, node) = (&args.pod_namespace, &args.pod_name, &args.node);
    let key = format!("{ns}/{name}");
    let started = Instant::now();
    let call_uid = (!args.pod_uid.is_empty()).then(|| args.pod_uid.clone());
    // Fast path: the reservation Filter made for this very pod; no need to
    // read the pod back.
    let reserved = app
        .cluster()
        .claim_reserved(&key, call_uid.as_deref(), node);
    let (devices, uid, pod, request) = match reserved {
        Some(d) => {
            let request = app.cluster().reserved_request(&key);
            let pod = Pod {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    uid: call_uid.clone(),
                    ..Default::default()
                },
                ..Default::default()
            };
            (d, call_uid, pod, request)
        }
        None => {
            let pods: kube::Api<Pod> = kube::Api::namespaced(app.client.clone(), ns);
            let pod = pods
                .get(name)
                .await
                .map_err(|e| format!("get pod {ns}/{name}: {e}"))?;
            let uid = pod.metadata.uid.clone();
            if let Some(other) = foreign_scheduler(&pod, &app.scheduler_name) {
                return Err(other);
            }
            if call_uid.is_some() && uid != call_uid {
                return Err(format!(
                    "pod {ns}/{name} has uid {uid:?}, not {} (it was replaced)",
                    args.pod_uid
                ));
            }
            let req = match app.engine.prepare(&pod) {
                Ok(r) => r,
                Err(e) => return Err(e.to_string()),
            };
            let Some(req) = req else {
                // Nothing of ours to allocate: a plain bind.
                return podio::bind(&app.client, ns, name, uid.as_deref(), node, BTreeMap::new())
                    .await
                    .map_err(|e| e.to_string());
            };
            let now = app.clock.now();
            let claimed = {
                let mut c = app.cluster();
                c.claim_for_bind(&app.engine, &req, uid.as_deref(), node, now)
            };
            match claimed {
                Ok(d) => (d, uid, pod, Some(req)),
                Err(why) => {
                    let msg = format!("node {node} cannot take pod {key}: {why}");
                    binding_failed(app, &pod, &msg).await;
                    return Err(msg);
                }
            }
        }
    };
    // A node whose agent names the pod itself (NRI, PodResources) needs no
    // lock: the reservation keeps concurrent decisions exact, and the
    // annotations travel in the Binding. Nor do devices whose plugin never
    // releases the lock (vendors that do not use it).
    let agent_labels = app.cluster().allocation_mode(node).lock_free();
    let lock_free = agent_labels || !app.engine.needs_node_lock(&devices);
    let mut gate_ms = 0;
    let locked = if lock_free {
        Ok(None)
    } else {
        let gate = app.node_gates.gate(node);
        let wait = app.lock_policy.wait;
        match tokio::time::timeout(wait, gate.gate.lock()).await {
            Ok(_turn) => {
                gate_ms = started.elapsed().as_millis();
                let cache = || app.cluster().cached_lock(node);
                lock::acquire_cached(
                    &app.client,
                    node,
                    &cache,
                    ns,
                    name,
                    app.clock.as_ref(),
                    &app.lock_policy,
                )
                .await
                .map(Some)
            }
            Err(_) => Err(hami_kube::Error::Locked {
                node: node.clone(),
                holder: "other binds queued in this scheduler".into(),
                since: "-".into(),
                waited_ms: wait.as_millis(),
            }),
        }
    };
    let lock_ms = started.elapsed().as_millis();
    let lock_value = match locked {
        Ok(v) => v,
        Err(e) => {
            app.cluster().release(&key);
            let msg = e.to_string();
            binding_failed(app, &pod, &msg).await;
            return Err(msg);
        }
    };
    // Under the lock, look again: leadership may have moved while this bind
    // waited, and a new leader may have given part of these cards away.
    // (Without a lock nothing waited: leadership was confirmed above.)
    let changed = match lock_value {
        Some(_) => match not_leading(app).await {
            None => app.cluster().overbooked(node, &devices),
            why => why,
        },
        None => app.cluster().overbooked(node, &devices),
    };
    if let Some(why) = changed {
        release_lock(app, node, lock_value.as_deref(), "of an abandoned bind").await;
        app.cluster().release(&key);
        let msg = format!("node {node} cannot take pod {key} now: {why}");
        binding_failed(app, &pod, &msg).await;
        return Err(msg);
    }
    // Locks of the vendors' own plugins (Cambricon's), which binds take as
    // HAMi's do and the plugins release after allocating.
    let mut plugin_locks: Vec<(String, String)> = Vec::new();
    let expiry = jiff::SignedDuration::from_secs(hami_sched::vendor::PLUGIN_LOCK_EXPIRY_SECS);
    for lock_key in request.iter().flat_map(|r| r.plugin_locks.iter()) {
        match lock::take_plugin_lock(&app.client, node, lock_key, app.clock.now(), expiry).await {
            Ok(value) => plugin_locks.push((lock_key.clone(), value)),
            Err(e) => {
                release_plugin_locks(app, node, &plugin_locks).await;
                release_lock(app, node, lock_value.as_deref(), "of an abandoned bind").await;
                app.cluster().release(&key);
                let msg = e.to_string();
                binding_failed(app, &pod, &msg).await;
                return Err(msg);
            }
        }
    }
    let annotations = {
        let c = app.cluster();
        bind_annotations(
            &app.engine,
            node,
            &devices,
            request.as_ref(),
            c.snapshot().node(node),
            app.clock.now(),
        )
    };
    let bind_time = annotations.get(hami_api::annotations::BIND_TIME).cloned();
    // The annotations travel in the Binding: they land with the node name
    // or not at all, so a failed bind leaves nothing on the pod to undo.
    // Bounded well inside the lock's bind grace (lock wait + httpTimeout),
    // so no other bind takes the lock over while this one may still land.
    let bound = match tokio::time::timeout(
        app.lock_policy.wait,
        podio::bind(&app.client, ns, name, uid.as_deref(), node, annotations),
    )
    .await
    {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the binding call did not answer within {}s",
            app.lock_policy.wait.as_secs()
        )),
    };
    let binding_ms = started.elapsed().as_millis() - lock_ms;
    if let Err(msg) = bound {
        // The error may hide a success (a lost response) or an earlier bind
        // of this very pod: the pod itself says which.
        let pods: kube::Api<Pod> = kube::Api::namespaced(app.client.clone(), ns);
        let now_bound_to = match pods.get_opt(name).await {
            Ok(Some(p)) if uid.is_none() || p.metadata.uid == uid => {
                p.spec.as_ref().and_then(|s| s.node_name.clone()).map(|n| {
                    let ours = p
                        .annotations()
                        .get(hami_api::annotations::BIND_TIME)
                        .is_some_and(|t| Some(t) == bind_time.as_ref());
                    (n, ours)
                })
            }
            _ => None,
        };
        match now_bound_to {
            Some((n, true)) if n == *node => {
                tracing::info!(pod = key, node, "bound (the binding's answer was lost)");
            }
            Some((n, false)) if n == *node => {
                // An earlier bind of this pod won; its annotations and its
                // lock stand, ours go.
                release_plugin_locks(app, node, &plugin_locks).await;
                app.cluster().release(&key);
                tracing::info!(
                    pod = key,
                    node,
                    "already bound to this node by an earlier bind"
                );
                return Ok(());
            }
            elsewhere => {
                release_plugin_locks(app, node, &plugin_locks).await;
                release_lock(app, node, lock_value.as_deref(), "after a failed bind").await;
                app.cluster().release(&key);
                let msg = match elsewhere {
                    Some((other, _)) => format!("{msg} (the pod is bound to node {other})"),
                    None => msg,
                };
                binding_failed(app, &pod, &msg).await;
                return Err(msg);
            }
        }
    }
    // HAMi also labels the pod with its node. The pod is bound whatever
    // happens here, so a failure is only logged. A lock-free node's agent
    // writes the label with its own patch when the container starts: one
    // write per pod fewer.
    let labels: BTreeMap<String, Option<String>> = [(
        hami_api::annotations::VGPU_NODE.to_string(),
        Some(node.clone()),
    )]
    .into();
    if !agent_labels
        && let Err(e) = podio::patch_metadata(
            &app.client,
            ns,
            name,
            uid.as_deref(),
            &BTreeMap::new(),
            &labels,
        )
        .await
    {
        tracing::warn!(pod = key, error = %e, "labelling a bound pod with its node");
    }
    tracing::info!(
        pod = key,
        node,
        lock_free,
        gate_ms,
        lock_ms,
        binding_ms,
        total_ms = started.elapsed().as_millis(),
        "bound"
    );
    Ok(())
}

/// Releases the node lock this bind holds, if it took one; a failure is
/// logged (the lock expires by itself).
async fn release_lock(app: &App, node: &str, held: Option<&str>, when: &str) {
    if let Some(value) = held
        && let Err(e) = lock::release_held(&app.client, node, value).await
    {
        tracing::warn!(error = %e, "releasing the node lock {when}");
    }
}

/// Removes the vendor plugins' locks this bind took (`(key, value)`), when
/// it did not bind; a failure is logged (the locks expire by themselves).
async fn release_plugin_locks(app: &App, node: &str, held: &[(String, String)]) {
    for (key, value) in held {
        if let Err(e) = lock::release_plugin_lock(&app.client, node, key, value).await {
            tracing::warn!(error = %e, "releasing {key} on node {node}");
        }
    }
}

async fn binding_failed(app: &App, pod: &Pod, message: &str) {
    if let Err(e) = app
        .events
        .pod_event(
            pod,
            Severity::Warning,
            "BindingFailed",
            message,
            app.clock.as_ref(),
        )
        .await
    {
        tracing::warn!(pod = pod.name_any(), error = %e, "writing BindingFailed event");
    }
}
