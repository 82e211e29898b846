//! Every value a node's lock annotation takes during a test, from a watch
//! of that node: a negative check ("the lock never appeared") needs every
//! change seen, not a sample.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::json;
use tokio::sync::Notify;

use hami_api::annotations as ann;

/// A node annotation the watch writes when stopped, to learn that it has
/// seen every change before.
const MARKER: &str = "test.hami.io/lock-watch-marker";

/// The lock values seen on one node until [`LockWatch::stop`].
pub struct LockWatch {
    seen: Arc<Mutex<Vec<String>>>,
    caught_up: Arc<Notify>,
    client: kube::Client,
    node: String,
    task: tokio::task::JoinHandle<()>,
}

impl LockWatch {
    /// Starts watching `node`; returns once the watch has listed it.
    pub async fn start(client: kube::Client, node: &str) -> LockWatch {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let caught_up = Arc::new(Notify::new());
        let (ready, listed) = tokio::sync::oneshot::channel::<()>();
        let cfg = watcher::Config::default().fields(&format!("metadata.name={node}"));
        let (recorder, notify) = (seen.clone(), caught_up.clone());
        let api = Api::<Node>::all(client.clone());
        let task = tokio::spawn(async move {
            let mut ready = Some(ready);
            let mut events = std::pin::pin!(watcher(api, cfg));
            while let Some(e) = events.next().await {
                let n = match e {
                    Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => n,
                    Ok(watcher::Event::InitDone) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                        continue;
                    }
                    _ => continue,
                };
                let a = n.metadata.annotations.unwrap_or_default();
                if let Some(v) = a.get(ann::NODE_LOCK) {
                    recorder
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(v.clone());
                }
                if a.contains_key(MARKER) {
                    notify.notify_one();
                }
            }
        });
        listed.await.expect("the node watch listed the node");
        LockWatch {
            seen,
            caught_up,
            client,
            node: node.to_string(),
            task,
        }
    }

    /// Writes a marker annotation, waits (up to `timeout`) for the watch to
    /// show it, so every change before it is recorded, and returns every
    /// lock value seen.
    pub async fn stop(self, timeout: Duration) -> Vec<String> {
        let stamp = jiff::Timestamp::now().to_string();
        Api::<Node>::all(self.client.clone())
            .patch(
                &self.node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {MARKER: stamp}}})),
            )
            .await
            .expect("marking the node");
        tokio::time::timeout(timeout, self.caught_up.notified())
            .await
            .expect("the node watch shows the marker");
        self.task.abort();
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
