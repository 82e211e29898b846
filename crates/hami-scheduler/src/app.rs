//! The HTTP surface: routes, body limits, and the shared state handlers use.

use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use hami_kube::cache::Synced;
use hami_kube::clock::Clock;
use hami_kube::events::EventWriter;
use hami_kube::leader::Leadership;
use hami_kube::lock::LockPolicy;
use hami_sched::Engine;

use crate::extender;
use crate::metrics::Metrics;
use crate::state::Cluster;
use crate::tls::Caller;
use crate::webhook;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct App {
    pub engine: Arc<Engine>,
    pub cluster: Arc<Mutex<Cluster>>,
    pub client: kube::Client,
    pub events: EventWriter,
    pub clock: Arc<dyn Clock>,
    pub leadership: Leadership,
    pub synced: Synced,
    pub metrics: Metrics,
    pub lock_policy: LockPolicy,
    /// Filter offers nodes whose bind lock is older than this (and whose
    /// holder still waits for its device plugin) only as a last resort.
    pub lock_busy_after: jiff::SignedDuration,
    pub scheduler_name: String,
    /// One in-process queue per node for binders waiting on its lock, so
    /// that only one of them at a time polls the API server.
    pub node_gates: NodeGates,
    /// Binds running at once are bounded: each holds a task and may hold a
    /// node lock, so hostile or runaway traffic must not grow them.
    pub bind_slots: Arc<tokio::sync::Semaphore>,
    /// Set when a background task (a watch, the resync) has died: the
    /// process is no longer ready and exits.
    pub failed: Failed,
    /// Binds running now, by pod: a Bind retried while the first still
    /// runs waits for that one's outcome instead of binding twice.
    pub bind_flights: BindFlights,
    /// Marks nodes whose cards were freed with no event of their own.
    pub requeue: crate::requeue::Requeue,
    /// Live card usage from the node monitors, for the dashboard.
    pub usage: crate::usage::LiveUsage,
    /// A card's usage older than this is not shown.
    pub usage_max_age: jiff::SignedDuration,
}

/// The outcome of one bind, shared with retries of it.
pub type BindOutcome = Option<Result<(), String>>;

/// A running bind: its node and where its outcome will appear.
type RunningBind = (String, tokio::sync::watch::Receiver<BindOutcome>);

/// Binds in flight by `namespace/name`.
#[derive(Clone, Default)]
pub struct BindFlights(Arc<Mutex<std::collections::HashMap<String, RunningBind>>>);

/// The first bind of a pod: publishes its outcome and leaves the map
/// when dropped (a panicked bind closes the channel, which joiners see).
pub struct Flight {
    flights: BindFlights,
    key: String,
    outcome: tokio::sync::watch::Sender<BindOutcome>,
}

impl Flight {
    pub fn finish(&self, result: &Result<(), String>) {
        self.outcome.send_replace(Some(result.clone()));
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        let mut m = self.flights.0.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(&self.key);
    }
}

impl BindFlights {
    /// Starts the bind of `key` to `node`, or joins the one running: `Err`
    /// holds that bind's node and its outcome channel.
    pub fn start(&self, key: &str, node: &str) -> Result<Flight, RunningBind> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((n, rx)) = m.get(key) {
            return Err((n.clone(), rx.clone()));
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        m.insert(key.to_string(), (node.to_string(), rx));
        Ok(Flight {
            flights: self.clone(),
            key: key.to_string(),
            outcome: tx,
        })
    }
}

/// A background task that stopped, by name.
#[derive(Clone, Default)]
pub struct Failed(Arc<Mutex<Option<String>>>);

impl Failed {
    pub fn set(&self, what: String) {
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(what);
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Per-node async mutexes, created on first use and dropped when no bind
/// holds or waits for them, so the map holds only nodes with binds in
/// flight (bounded by the bind slots, whatever node names callers invent).
#[derive(Clone, Default)]
pub struct NodeGates(Arc<Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>>);

/// A bind's handle on its node's gate; removes the gate when it is the
/// last one.
pub struct GateHandle {
    gates: NodeGates,
    node: String,
    pub gate: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for GateHandle {
    fn drop(&mut self) {
        let mut m = self.gates.0.lock().unwrap_or_else(|e| e.into_inner());
        // Two references: the map's and ours. Nobody else waits.
        if Arc::strong_count(&self.gate) == 2 {
            m.remove(&self.node);
        }
    }
}

impl NodeGates {
    pub fn gate(&self, node: &str) -> GateHandle {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let gate = m.entry(node.to_string()).or_default().clone();
        GateHandle {
            gates: self.clone(),
            node: node.to_string(),
            gate,
        }
    }

    /// Nodes with a gate (binds holding or waiting for it).
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl App {
    /// The cluster state. A handler that panicked while holding the lock
    /// left it consistent (every method finishes its bookkeeping before it
    /// can fail), so a poisoned lock is still usable.
    pub fn cluster(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// All routes of the HTTPS server. The extender verbs are checked for
/// their caller before their body is read.
pub fn router(app: App, max_body_bytes: usize) -> Router {
    let extender = Router::new()
        .route("/filter", post(filter))
        .route("/bind", post(bind))
        .route_layer(axum::middleware::from_fn(only_kube_scheduler));
    Router::new()
        .merge(extender)
        .route("/webhook", post(admission))
        .merge(observability())
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(app)
}

/// The routes of the plain-HTTP metrics server.
pub fn observability() -> Router<App> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

fn bad_request(what: &str, e: impl std::fmt::Display) -> Response {
    (StatusCode::BAD_REQUEST, format!("malformed {what}: {e}\n")).into_response()
}

fn decode<T: DeserializeOwned>(what: &str, body: &Bytes) -> Result<T, Box<Response>> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| Box::new(bad_request(what, e)))
}

/// The extender verbs answer kube-scheduler only (see [`Caller`]).
async fn only_kube_scheduler(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match req.extensions().get::<Caller>() {
        Some(c) if c.may_call_extender() => next.run(req).await,
        other => {
            let who = other.map_or("an unknown caller".to_string(), |c| c.peer.to_string());
            tracing::warn!(
                caller = who,
                "extender call refused: not loopback and no client certificate"
            );
            (
                StatusCode::FORBIDDEN,
                format!("{who}: the extender verbs answer kube-scheduler in this pod (loopback) or a caller with a client certificate\n"),
            )
                .into_response()
        }
    }
}

async fn filter(State(app): State<App>, body: Bytes) -> Response {
    let args: extender::ExtenderArgs = match decode("ExtenderArgs", &body) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    Json(extender::filter(&app, args).await).into_response()
}

async fn bind(State(app): State<App>, body: Bytes) -> Response {
    let args: extender::ExtenderBindingArgs = match decode("ExtenderBindingArgs", &body) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    Json(extender::bind(&app, args).await).into_response()
}

async fn admission(State(app): State<App>, body: Bytes) -> Response {
    let review: serde_json::Value = match decode("AdmissionReview", &body) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    match webhook::review(&app.engine, &app.scheduler_name, &review) {
        Ok(v) => Json(v).into_response(),
        Err(e) => bad_request("AdmissionReview", e),
    }
}

async fn readyz(State(app): State<App>) -> Response {
    if let Some(what) = app.failed.get() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{what}\n")).into_response();
    }
    if app.synced.get() {
        "ok".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "node and pod caches not synced yet\n",
        )
            .into_response()
    }
}

async fn metrics(State(app): State<App>) -> Response {
    // Copy under the lock, render outside it: Filter and Bind wait for
    // that lock, a scrape must not hold it while it formats text.
    let snapshot = app.cluster().snapshot().clone();
    let text = app.metrics.render(&snapshot);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
