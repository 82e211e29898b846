//! The scheduler's view of the cluster: the engine's [`Snapshot`] fed by
//! the node and pod watches, plus the decisions Filter has made that the
//! API server does not show yet (reservations).
//!
//! Everything here is synchronous and takes the time as an argument, so the
//! rules (handshake health, reservation expiry, stuck binds) are unit-tested
//! without a cluster. Callers hold the one mutex around [`Cluster`] only
//! for the duration of a call, never across I/O.

use std::collections::{BTreeMap, HashMap};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;

use hami_api::allocation::PodDevices;
use hami_api::annotations as ann;
use hami_kube::cache::Inventory;
use hami_kube::handshake;
use hami_sched::{Decision, Engine, Mode, PodRequest, Snapshot, Vendor, pod_key};

/// A Filter decision not yet visible in the API server.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub uid: Option<String>,
    pub node: String,
    pub devices: PodDevices,
    pub at: Timestamp,
    /// Bind has started: the sweeper leaves it to the bind's own outcome.
    pub binding: bool,
}

/// What Filter answers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FilterOutcome {
    pub node: Option<String>,
    /// Rejected node -> reason in HAMi's words.
    pub failed: BTreeMap<String, String>,
}

/// A pod past its bind whose device plugin never answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StuckPod {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub node: String,
}

#[derive(Debug, Clone)]
struct NodeEntry {
    node: Node,
    healthy: bool,
}

#[derive(Debug, Clone)]
struct PodEntry {
    uid: Option<String>,
    node: Option<String>,
    bind_phase: Option<String>,
    bind_time: Option<i64>,
    phase: Option<String>,
}

/// Cluster state shared by the watches and the handlers.
#[derive(Debug, Default)]
pub struct Cluster {
    snapshot: Snapshot,
    nodes: HashMap<String, NodeEntry>,
    node_inventory: Inventory,
    pods: HashMap<String, PodEntry>,
    pod_inventory: Inventory,
    reservations: HashMap<String, Reservation>,
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref().and_then(|s| s.phase.as_deref())
}

impl Cluster {
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    pub fn reservation(&self, key: &str) -> Option<&Reservation> {
        self.reservations.get(key)
    }

    /// Names of nodes currently judged unhealthy by the handshake rules.
    pub fn unhealthy_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, e)| !e.healthy)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    // ---- nodes

    pub fn nodes_restart(&mut self) {
        self.node_inventory.restart();
    }

    /// Applies a node from the watch. Returns the handshake value to write
    /// back, if any.
    pub fn upsert_node(&mut self, engine: &Engine, node: Node, now: Timestamp) -> Option<String> {
        let name = node.name_any();
        self.node_inventory.upsert(&name);
        let verdict = handshake::judge(&node, now, &engine.nvidia.config.resource_count_name);
        self.apply_node(engine, &name, &node, verdict.healthy);
        self.nodes.insert(
            name,
            NodeEntry {
                node,
                healthy: verdict.healthy,
            },
        );
        verdict.answer
    }

    fn apply_node(&mut self, engine: &Engine, name: &str, node: &Node, healthy: bool) {
        if !healthy {
            if self.snapshot.remove_node(name) {
                tracing::warn!(
                    node = name,
                    "node stopped reporting (handshake stale); its devices leave the cache"
                );
            }
            return;
        }
        if let Err(e) = engine.add_node(&mut self.snapshot, node) {
            tracing::warn!(node = name, error = %e, "node registration not understood; node ignored");
        }
    }

    pub fn delete_node(&mut self, name: &str) {
        self.node_inventory.delete(name);
        self.nodes.remove(name);
        self.snapshot.remove_node(name);
    }

    pub fn nodes_synced(&mut self) {
        for name in self.node_inventory.synced() {
            self.nodes.remove(&name);
            self.snapshot.remove_node(&name);
        }
    }

    /// Re-judges every node's handshake at `now` (staleness is a matter of
    /// time, not only of events). Returns `(node, value to write)` pairs.
    pub fn rejudge_nodes(&mut self, engine: &Engine, now: Timestamp) -> Vec<(String, String)> {
        let mut answers = Vec::new();
        let mut flips = Vec::new();
        for (name, entry) in &self.nodes {
            let v = handshake::judge(&entry.node, now, &engine.nvidia.config.resource_count_name);
            if v.healthy != entry.healthy {
                flips.push((name.clone(), v.healthy));
            }
            if let Some(a) = v.answer {
                answers.push((name.clone(), a));
            }
        }
        for (name, healthy) in flips {
            let node = match self.nodes.get_mut(&name) {
                Some(e) => {
                    e.healthy = healthy;
                    e.node.clone()
                }
                None => continue,
            };
            self.apply_node(engine, &name, &node, healthy);
        }
        answers
    }

    // ---- pods

    pub fn pods_restart(&mut self) {
        self.pod_inventory.restart();
    }

    /// Applies a pod from the watch.
    pub fn upsert_pod(&mut self, engine: &Engine, pod: &Pod) {
        let key = pod_key(pod);
        self.pod_inventory.upsert(&key);
        let bind_phase = annotation(pod, ann::BIND_PHASE);
        let running = phase(pod) == Some("Running");
        // A bind the scheduler gave up on holds nothing unless the pod runs
        // anyway (then its devices are in use, whatever the annotation says).
        let given_up = bind_phase == Some("failed") && !running;
        let record = if given_up {
            None
        } else {
            match engine.pod_record(pod) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(pod = key, error = %e, "allocation annotation not understood; pod holds nothing");
                    None
                }
            }
        };
        match record {
            Some(r) => {
                self.reservations.remove(&key);
                self.snapshot.add_pod(&key, r);
            }
            None => {
                let keep = self
                    .reservations
                    .get(&key)
                    .is_some_and(|r| r.uid.is_none() || r.uid == pod.metadata.uid)
                    && !matches!(phase(pod), Some("Succeeded" | "Failed"))
                    && pod.metadata.deletion_timestamp.is_none();
                if !keep {
                    self.reservations.remove(&key);
                    self.snapshot.remove_pod(&key);
                }
            }
        }
        if bind_phase.is_some() || annotation(pod, ann::VGPU_NODE).is_some() {
            self.pods.insert(
                key,
                PodEntry {
                    uid: pod.metadata.uid.clone(),
                    node: annotation(pod, ann::VGPU_NODE).map(str::to_string),
                    bind_phase: bind_phase.map(str::to_string),
                    bind_time: annotation(pod, ann::BIND_TIME).and_then(|t| t.parse().ok()),
                    phase: phase(pod).map(str::to_string),
                },
            );
        } else {
            self.pods.remove(&key);
        }
    }

    pub fn delete_pod(&mut self, key: &str) {
        self.pod_inventory.delete(key);
        self.pods.remove(key);
        self.reservations.remove(key);
        self.snapshot.remove_pod(key);
    }

    pub fn pods_synced(&mut self) {
        for key in self.pod_inventory.synced() {
            self.pods.remove(&key);
            self.reservations.remove(&key);
            self.snapshot.remove_pod(&key);
        }
    }

    // ---- decisions

    /// Filter: the best node among `candidates` and why the others were
    /// rejected. A fitting decision is reserved at once, so the next pod
    /// filtered sees it.
    pub fn filter(
        &mut self,
        engine: &Engine,
        req: &PodRequest,
        uid: Option<&str>,
        candidates: &[String],
        now: Timestamp,
    ) -> FilterOutcome {
        // A pod being filtered is not bound: whatever it held before (an
        // earlier decision, a failed bind's annotations) no longer counts.
        self.reservations.remove(&req.key);
        self.snapshot.remove_pod(&req.key);
        let decision = engine.filter(&self.snapshot, req, Some(candidates), Mode::Explain);
        let outcome = FilterOutcome {
            node: decision.node.map(str::to_string),
            failed: decision
                .rejected
                .iter()
                .map(|(n, r)| (n.to_string(), r.to_string()))
                .collect(),
        };
        if let Some(node) = &outcome.node {
            let devices = decision.devices.clone();
            engine.reserve(&mut self.snapshot, req, node, devices.clone());
            self.reservations.insert(
                req.key.clone(),
                Reservation {
                    uid: uid.map(str::to_string),
                    node: node.clone(),
                    devices,
                    at: now,
                    binding: false,
                },
            );
        }
        outcome
    }

    /// The devices to bind `key` with on `node`: the reservation Filter
    /// made, else (a restarted scheduler, a pod filtered elsewhere) a fresh
    /// decision restricted to that node. Marks the reservation as binding.
    pub fn claim_for_bind(
        &mut self,
        engine: &Engine,
        req: &PodRequest,
        uid: Option<&str>,
        node: &str,
        now: Timestamp,
    ) -> Result<PodDevices, String> {
        if let Some(r) = self.reservations.get_mut(&req.key)
            && r.node == node
            && (r.uid.is_none() || r.uid.as_deref() == uid)
        {
            r.binding = true;
            return Ok(r.devices.clone());
        }
        let candidates = [node.to_string()];
        let outcome = self.filter(engine, req, uid, &candidates, now);
        match outcome.node {
            Some(_) => {
                let r = self
                    .reservations
                    .get_mut(&req.key)
                    .expect("filter reserved the decision");
                r.binding = true;
                Ok(r.devices.clone())
            }
            None => Err(outcome
                .failed
                .get(node)
                .cloned()
                .unwrap_or_else(|| "node unknown to the scheduler".into())),
        }
    }

    /// Forgets a reservation (a failed bind, an expired decision).
    pub fn release(&mut self, key: &str) {
        if self.reservations.remove(key).is_some() {
            self.snapshot.remove_pod(key);
        }
    }

    /// Releases decisions Filter made that no bind followed within `ttl`
    /// (kube-scheduler chose no node, or the pod went elsewhere).
    pub fn expire_reservations(&mut self, now: Timestamp, ttl: SignedDuration) -> Vec<String> {
        let old: Vec<String> = self
            .reservations
            .iter()
            .filter(|(_, r)| !r.binding && now.duration_since(r.at) > ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &old {
            self.release(k);
        }
        old
    }

    /// Pods still Pending in `bind-phase=allocating` longer than `timeout`.
    pub fn stuck_allocating(&self, now: Timestamp, timeout: SignedDuration) -> Vec<StuckPod> {
        let mut v: Vec<StuckPod> = self
            .pods
            .iter()
            .filter(|(_, p)| {
                p.bind_phase.as_deref() == Some("allocating")
                    && matches!(p.phase.as_deref(), None | Some("Pending"))
                    && p.bind_time
                        .is_some_and(|t| now.as_second() - t > timeout.as_secs())
            })
            .filter_map(|(k, p)| {
                let (ns, name) = k.split_once('/')?;
                Some(StuckPod {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    uid: p.uid.clone(),
                    node: p.node.clone().unwrap_or_default(),
                })
            })
            .collect();
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        v
    }

    /// A stuck pod was marked failed: it holds nothing from now on.
    pub fn give_up(&mut self, key: &str) {
        self.reservations.remove(key);
        self.snapshot.remove_pod(key);
        if let Some(p) = self.pods.get_mut(key) {
            p.bind_phase = Some("failed".into());
        }
    }
}

/// The annotations Bind writes for a decision (node, devices, times, phase).
pub fn bind_annotations(
    engine: &Engine,
    node: &str,
    devices: &PodDevices,
    now: Timestamp,
) -> BTreeMap<String, Option<String>> {
    let decision = Decision {
        node: Some(node),
        devices: devices.clone(),
        rejected: Vec::new(),
    };
    let vendor: &dyn Vendor = &engine.nvidia;
    let mut m: BTreeMap<String, Option<String>> = decision
        .annotations(vendor)
        .into_iter()
        .map(|(k, v)| (k, Some(v)))
        .collect();
    let secs = now.as_second().to_string();
    m.insert(ann::VGPU_TIME.into(), Some(secs.clone()));
    m.insert(ann::BIND_PHASE.into(), Some("allocating".into()));
    m.insert(ann::BIND_TIME.into(), Some(secs));
    m
}

/// The annotations that undo a failed bind: the pod holds nothing and a
/// device plugin will not pick it up.
pub fn failed_bind_annotations(engine: &Engine) -> BTreeMap<String, Option<String>> {
    let (to_allocate, allocated) = engine.nvidia.allocation_annotations();
    let mut m = BTreeMap::new();
    m.insert(ann::BIND_PHASE.to_string(), Some("failed".to_string()));
    m.insert(to_allocate.to_string(), None);
    m.insert(allocated.to_string(), None);
    m.insert(ann::VGPU_NODE.to_string(), None);
    m
}
