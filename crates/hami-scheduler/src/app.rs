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
}

/// Per-node async mutexes, created on first use.
#[derive(Clone, Default)]
pub struct NodeGates(Arc<Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>>);

impl NodeGates {
    pub fn gate(&self, node: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(node.to_string()).or_default().clone()
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

/// All routes of the HTTPS server.
pub fn router(app: App, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/filter", post(filter))
        .route("/bind", post(bind))
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
    let text = {
        let c = app.cluster();
        app.metrics.render(c.snapshot())
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
