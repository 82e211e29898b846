//! Leader election with a `coordination.k8s.io/v1` Lease.
//!
//! One replica holds the Lease and renews it; the others watch it expire
//! before taking it. Every write goes through a resourceVersion check, so
//! two replicas can never both win the same term. Only the leader writes
//! annotations; [`Leadership::is_leader`] is what the writers ask.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};

use crate::clock::Clock;
use crate::error::{is_conflict, is_not_found};
use crate::{Error, Result};

/// Where the Lease lives and how long a term lasts.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's name in the Lease (pod name, usually).
    pub identity: String,
    /// A Lease not renewed for this long may be taken.
    pub duration: Duration,
    /// How often the holder renews (and others look).
    pub renew_every: Duration,
}

/// Shared view of whether this replica leads.
#[derive(Debug, Clone)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    /// Always leader: for a single replica without election.
    pub fn always() -> Leadership {
        Leadership(Arc::new(AtomicBool::new(true)))
    }

    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, v: bool) {
        let was = self.0.swap(v, Ordering::AcqRel);
        if was != v {
            tracing::info!(leader = v, "leadership changed");
        }
    }
}

/// What one look at the Lease decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Term {
    /// We hold it (took or renewed it).
    Leading,
    /// Someone else holds a live Lease.
    Following,
}

/// Whether a Lease held by someone else has expired at `now`.
pub fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    now.duration_since(renewed.0) > SignedDuration::from_secs(secs)
}

/// Takes or renews the Lease once.
pub async fn try_lead(client: &Client, cfg: &LeaseConfig, clock: &dyn Clock) -> Result<Term> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let now = clock.now();
    let duration = i32::try_from(cfg.duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let current = leases
        .get_opt(&cfg.name)
        .await
        .map_err(|e| Error::api(format!("get lease {}/{}", cfg.namespace, cfg.name), e))?;
    let Some(mut lease) = current else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Term::Leading),
            // Another replica created it first.
            Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(Term::Following),
            Err(e) => Err(Error::api(format!("create lease {}", cfg.name), e)),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let ours = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
    if !ours
        && !expired(spec, now)
        && spec
            .holder_identity
            .as_deref()
            .is_some_and(|h| !h.is_empty())
    {
        return Ok(Term::Following);
    }
    if !ours {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(duration);
    spec.renew_time = Some(MicroTime(now));
    // `replace` carries the resourceVersion we read: a concurrent writer
    // makes this fail with 409 instead of both of us winning.
    match leases
        .replace(&cfg.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(Term::Leading),
        Err(e) if is_conflict(&e) => Ok(Term::Following),
        Err(e) if is_not_found(&e) => Ok(Term::Following),
        Err(e) => Err(Error::api(format!("update lease {}", cfg.name), e)),
    }
}

/// Runs the election until the returned task is dropped or aborted. The
/// flag turns false as soon as a renewal has not succeeded for a whole
/// term, so a cut-off leader stops writing before another can take over.
pub fn spawn(
    client: Client,
    cfg: LeaseConfig,
    clock: Arc<dyn Clock>,
) -> (Leadership, tokio::task::JoinHandle<()>) {
    let leadership = Leadership(Arc::new(AtomicBool::new(false)));
    let flag = leadership.clone();
    let task = tokio::spawn(async move {
        let mut last_ok: Option<std::time::Instant> = None;
        loop {
            match try_lead(&client, &cfg, clock.as_ref()).await {
                Ok(Term::Leading) => {
                    last_ok = Some(std::time::Instant::now());
                    flag.set(true);
                }
                Ok(Term::Following) => {
                    last_ok = None;
                    flag.set(false);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election");
                    // Keep leading only while the last renewal is recent:
                    // stop a little before the Lease can expire for others.
                    let safe = cfg.duration.saturating_sub(cfg.renew_every);
                    if last_ok.is_none_or(|t| t.elapsed() >= safe) {
                        flag.set(false);
                    }
                }
            }
            tokio::time::sleep(cfg.renew_every).await;
        }
    });
    (leadership, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_expiry() {
        let t: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let spec = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(t)),
            ..Default::default()
        };
        assert!(!expired(&spec, t + SignedDuration::from_secs(15)));
        assert!(expired(&spec, t + SignedDuration::from_secs(16)));
        assert!(expired(&LeaseSpec::default(), t));
    }
}
