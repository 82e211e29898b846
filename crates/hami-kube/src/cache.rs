//! Watch-based caches. [`watch`] turns a kube-rs watcher into a stream of
//! [`Change`]s; [`Inventory`] tells a consumer which objects vanished while
//! the watch was re-listing, so a cache rebuilt after a disconnect (or a
//! restart) holds exactly what the API server holds.

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// One change of a watched collection.
#[derive(Debug, Clone)]
pub enum Change<K> {
    /// A full re-list begins; objects not upserted before the next
    /// [`Change::Synced`] are gone.
    Restart,
    /// An object was added or modified (or listed during a re-list).
    Upsert(K),
    /// An object was deleted.
    Delete(K),
    /// The (re-)list is complete: the cache now mirrors the API server.
    Synced,
}

/// Watches `api`, optionally restricted by a label selector. Errors are
/// logged and retried with backoff by the underlying watcher, so the stream
/// only ends when it is dropped.
pub fn watch<K>(api: Api<K>, label_selector: Option<&str>) -> impl Stream<Item = Change<K>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut config = watcher::Config::default();
    if let Some(sel) = label_selector.filter(|s| !s.is_empty()) {
        config = config.labels(sel);
    }
    let kind = std::any::type_name::<K>();
    watcher::watcher(api, config)
        .default_backoff()
        .filter_map(move |event| async move {
            match event {
                Ok(Event::Init) => Some(Change::Restart),
                Ok(Event::InitApply(o) | Event::Apply(o)) => Some(Change::Upsert(o)),
                Ok(Event::Delete(o)) => Some(Change::Delete(o)),
                Ok(Event::InitDone) => Some(Change::Synced),
                Err(e) => {
                    tracing::warn!(kind, error = %e, "watch failed; retrying");
                    None
                }
            }
        })
}

/// `namespace/name` (or `name` for cluster-scoped objects).
pub fn object_key<K: Resource>(o: &K) -> String {
    match o.namespace() {
        Some(ns) => format!("{ns}/{}", o.name_any()),
        None => o.name_any(),
    }
}

/// Which keys a cache holds, so that a re-list can name the ones that
/// disappeared while the watch was down.
#[derive(Debug, Default)]
pub struct Inventory {
    known: HashSet<String>,
    seen: Option<HashSet<String>>,
}

impl Inventory {
    pub fn restart(&mut self) {
        self.seen = Some(HashSet::new());
    }

    pub fn upsert(&mut self, key: &str) {
        if let Some(seen) = self.seen.as_mut() {
            seen.insert(key.to_string());
        }
        self.known.insert(key.to_string());
    }

    pub fn delete(&mut self, key: &str) {
        self.known.remove(key);
        if let Some(seen) = self.seen.as_mut() {
            seen.remove(key);
        }
    }

    /// Ends a re-list; returns the keys that were not listed again.
    pub fn synced(&mut self) -> Vec<String> {
        let Some(seen) = self.seen.take() else {
            return Vec::new();
        };
        let gone: Vec<String> = self.known.difference(&seen).cloned().collect();
        for k in &gone {
            self.known.remove(k);
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

/// Set once every cache has finished its first list (for `/readyz`).
#[derive(Debug, Clone, Default)]
pub struct Synced(Arc<AtomicBool>);

impl Synced {
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relist_names_what_vanished() {
        let mut inv = Inventory::default();
        inv.restart();
        inv.upsert("a");
        inv.upsert("b");
        assert!(inv.synced().is_empty());
        inv.upsert("c");
        inv.delete("a");
        // The watch breaks and re-lists: b is gone meanwhile.
        inv.restart();
        inv.upsert("c");
        let gone = inv.synced();
        assert_eq!(gone, vec!["b".to_string()]);
        assert_eq!(inv.len(), 1);
        // A second Synced without a Restart reports nothing.
        assert!(inv.synced().is_empty());
    }
}
