//! The operator dashboard: `/ui` (one embedded page, no external network)
//! and the JSON API it reads, `/api/v1/summary`, `/api/v1/nodes` and
//! `/api/v1/pending` (docs/dashboard.md). Served on its own plain-HTTP
//! listener (`--dashboard-bind-address`, loopback by default), never on
//! the extender/webhook port: it lists every GPU pod of the cluster, so
//! who may see it is decided by who may port-forward to the scheduler pod.
//!
//! The numbers come from the same snapshot the engine decides on and the
//! metrics render, so the page, `/metrics` and the placements agree.

use std::collections::{BTreeMap, HashMap};

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Serialize;

use crate::app::App;
use crate::state::Cluster;

const PAGE: &str = include_str!("ui/index.html");

/// The dashboard's routes.
pub fn router() -> Router<App> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui") }))
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/api/v1/summary", get(summary))
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/pending", get(pending))
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Nothing but this page's own inline code and same-origin calls.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

/// Used and total of one quantity.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Amount {
    pub used: u64,
    pub total: u64,
}

impl Amount {
    fn add(&mut self, used: u64, total: u64) {
        self.used += used;
        self.total += total;
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    pub slots: Amount,
    pub memory_mi_b: Amount,
    pub cores: Amount,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SchedulerInfo {
    pub name: String,
    pub version: &'static str,
    pub leader: bool,
    pub generated_at: String,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub nodes: usize,
    pub healthy_nodes: usize,
    pub cards: usize,
    #[serde(flatten)]
    pub capacity: Capacity,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Model {
    pub model: String,
    pub cards: usize,
    #[serde(flatten)]
    pub capacity: Capacity,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub scheduler: SchedulerInfo,
    pub totals: Totals,
    pub models: Vec<Model>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodShare {
    pub namespace: String,
    pub name: String,
    /// The container's position among the pod's containers (init
    /// containers first), as in HAMi's annotations.
    pub container: String,
    pub memory_mi_b: u64,
    pub cores: u32,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Card {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    pub health: bool,
    pub numa: i32,
    #[serde(flatten)]
    pub capacity: Capacity,
    pub pods: Vec<PodShare>,
    /// Live usage from the node monitor (`--node-monitor-selector`); null
    /// when not read recently.
    pub usage: Option<crate::usage::CardUsage>,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub name: String,
    pub healthy: bool,
    pub handshake: Option<String>,
    pub allocation_mode: &'static str,
    pub reason: Option<String>,
    pub cards: Vec<Card>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Nodes {
    pub nodes: Vec<NodeInfo>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
    pub nodes: usize,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PendingPod {
    pub namespace: String,
    pub name: String,
    pub since: Option<String>,
    pub request: String,
    pub reason: Option<String>,
    pub rejections: Vec<Rejection>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PendingPods {
    pub pods: Vec<PendingPod>,
}

/// Cluster totals and totals per card model.
pub fn totals(c: &Cluster) -> (Totals, Vec<Model>) {
    let views = c.node_views();
    let mut totals = Totals {
        nodes: views.len(),
        healthy_nodes: views.iter().filter(|v| v.healthy).count(),
        cards: 0,
        capacity: Capacity::default(),
    };
    let mut models: BTreeMap<String, Model> = BTreeMap::new();
    for node in c.snapshot().nodes() {
        for d in &node.devices {
            let model = models
                .entry(d.info.device_type.clone())
                .or_insert_with(|| Model {
                    model: d.info.device_type.clone(),
                    cards: 0,
                    capacity: Capacity::default(),
                });
            for (cards, cap) in [
                (&mut totals.cards, &mut totals.capacity),
                (&mut model.cards, &mut model.capacity),
            ] {
                *cards += 1;
                cap.slots
                    .add(u64::from(d.used.slots), u64::from(d.info.count));
                cap.memory_mi_b.add(d.used.mem, d.info.devmem);
                cap.cores
                    .add(u64::from(d.used.cores), u64::from(d.info.devcore));
            }
        }
    }
    (totals, models.into_values().collect())
}

/// Every GPU node with its cards and the pods sharing each card.
pub fn node_list(c: &Cluster, usage: &dyn Fn(&str) -> Option<crate::usage::CardUsage>) -> Nodes {
    let snapshot = c.snapshot();
    let mut on_card: HashMap<&str, Vec<PodShare>> = HashMap::new();
    for (key, record) in snapshot.pods() {
        let (namespace, name) = key.split_once('/').unwrap_or(("", key));
        for (ci, container) in record.devices.0.iter().enumerate() {
            for d in container.iter().filter(|d| !d.uuid.is_empty()) {
                on_card.entry(d.uuid.as_str()).or_default().push(PodShare {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    container: ci.to_string(),
                    memory_mi_b: d.mem,
                    cores: d.cores,
                });
            }
        }
    }
    let nodes = c
        .node_views()
        .into_iter()
        .map(|v| {
            let cards = snapshot
                .node(&v.name)
                .map(|n| {
                    n.devices
                        .iter()
                        .map(|d| {
                            let mut pods = on_card.remove(d.info.id.as_str()).unwrap_or_default();
                            pods.sort_by(|a, b| {
                                (&a.namespace, &a.name, &a.container).cmp(&(
                                    &b.namespace,
                                    &b.name,
                                    &b.container,
                                ))
                            });
                            Card {
                                uuid: d.info.id.clone(),
                                index: d.info.index,
                                model: d.info.device_type.clone(),
                                health: d.info.health,
                                numa: d.info.numa,
                                capacity: Capacity {
                                    slots: Amount {
                                        used: u64::from(d.used.slots),
                                        total: u64::from(d.info.count),
                                    },
                                    memory_mi_b: Amount {
                                        used: d.used.mem,
                                        total: d.info.devmem,
                                    },
                                    cores: Amount {
                                        used: u64::from(d.used.cores),
                                        total: u64::from(d.info.devcore),
                                    },
                                },
                                pods,
                                usage: usage(&d.info.id),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            NodeInfo {
                reason: (!v.healthy).then(|| {
                    format!(
                        "the device plugin has not answered the handshake ({}); its cards are withheld",
                        v.handshake.as_deref().unwrap_or("none")
                    )
                }),
                name: v.name,
                healthy: v.healthy,
                handshake: v.handshake,
                allocation_mode: v.mode.as_str(),
                cards,
            }
        })
        .collect();
    Nodes { nodes }
}

/// The GPU pods of `scheduler_name` waiting for a node, oldest first.
pub fn pending_list(c: &Cluster, scheduler_name: &str) -> PendingPods {
    let mut pods: Vec<PendingPod> = c
        .pending()
        .filter(|(_, p)| p.scheduler_name == scheduler_name)
        .map(|(key, p)| {
            let (namespace, name) = key.split_once('/').unwrap_or(("", key));
            let mut rejections: Vec<Rejection> = p
                .rejections
                .iter()
                .map(|(reason, &nodes)| Rejection {
                    reason: reason.clone(),
                    nodes,
                })
                .collect();
            rejections.sort_by(|a, b| b.nodes.cmp(&a.nodes).then(a.reason.cmp(&b.reason)));
            PendingPod {
                namespace: namespace.to_string(),
                name: name.to_string(),
                since: p.since.map(|t| t.to_string()),
                request: p.request.clone(),
                reason: p.reason.clone(),
                rejections,
            }
        })
        .collect();
    pods.sort_by(|a, b| (&a.since, &a.namespace, &a.name).cmp(&(&b.since, &b.namespace, &b.name)));
    PendingPods { pods }
}

async fn summary(State(app): State<App>) -> Response {
    let (totals, models) = totals(&app.cluster());
    axum::Json(Summary {
        scheduler: SchedulerInfo {
            name: app.scheduler_name.clone(),
            version: env!("CARGO_PKG_VERSION"),
            leader: app.leadership.is_leader(),
            generated_at: app.clock.now().to_string(),
        },
        totals,
        models,
    })
    .into_response()
}

async fn nodes(State(app): State<App>) -> Response {
    let now = app.clock.now();
    let usage = |uuid: &str| app.usage.get(uuid, now, app.usage_max_age);
    axum::Json(node_list(&app.cluster(), &usage)).into_response()
}

async fn pending(State(app): State<App>) -> Response {
    axum::Json(pending_list(&app.cluster(), &app.scheduler_name)).into_response()
}
