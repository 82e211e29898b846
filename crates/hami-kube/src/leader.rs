//! Leadership that follows kube-scheduler's.
//!
//! hami-scheduler runs as the extender beside kube-scheduler, in the same
//! pod. kube-scheduler elects its own leader with a `coordination.k8s.io/v1`
//! Lease and only the leader calls its extender, so the extender must not
//! hold an election of its own: with N replicas, a separate election would
//! make the active kube-scheduler's extender a follower N-1 times in N.
//! Instead this module only *reads* kube-scheduler's Lease (never writes
//! it) and says "leader" exactly when the Lease is live and its holder is
//! this pod. kube-scheduler writes `<hostname>_<uuid>` as the holder
//! identity, and both containers of a pod share the host name.
//!
//! A Lease counts as live for its `leaseDurationSeconds` after this
//! process last saw it change (as client-go's elector does), so a skewed
//! clock on either side cannot extend a dead leader's term.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use crate::{Error, Result};

/// Which Lease to follow and who we are in it.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    /// kube-scheduler's `leaderElection.resourceName`.
    pub name: String,
    /// This pod's host name: the part of the holder identity before the
    /// last `_`.
    pub identity: String,
}

/// The host name as the kernel knows it (in this UTS namespace), which is
/// what kube-scheduler's `os.Hostname()` reads; `HOSTNAME` as a fallback.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
}

/// Whether a Lease holder identity names the pod with host name `identity`.
/// kube-scheduler writes `<hostname>_<uuid>`; an identity without `_` is
/// compared whole. Exact, not a prefix: `sched-1` must not match
/// `sched-10_…`.
pub fn holder_is(holder: &str, identity: &str) -> bool {
    let host = holder.rsplit_once('_').map_or(holder, |(h, _)| h);
    !identity.is_empty() && host == identity
}

/// What was last seen of the Lease.
#[derive(Debug, Clone)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<jiff::Timestamp>,
    duration: Duration,
    /// When this process saw the holder or renew time change.
    changed_at: Instant,
}

struct Follower {
    cfg: LeaseConfig,
    client: Client,
    observed: Mutex<Option<Observed>>,
    was_leader: Mutex<bool>,
}

/// Whether this replica leads. Cheap to clone and to ask.
#[derive(Clone)]
pub struct Leadership(Option<Arc<Follower>>);

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Leadership(always)"),
            Some(x) => write!(
                f,
                "Leadership(following {}/{} as {})",
                x.cfg.namespace, x.cfg.name, x.cfg.identity
            ),
        }
    }
}

impl Leadership {
    /// Always leader: a single replica with kube-scheduler's leader
    /// election off (and the tests of a standalone scheduler).
    pub fn always() -> Leadership {
        Leadership(None)
    }

    /// Leader exactly when the followed Lease is live and held by us.
    pub fn is_leader(&self) -> bool {
        let Some(f) = &self.0 else {
            return true;
        };
        let leads = {
            let o = f.observed.lock().unwrap_or_else(|e| e.into_inner());
            o.as_ref().is_some_and(|o| {
                o.holder
                    .as_deref()
                    .is_some_and(|h| holder_is(h, &f.cfg.identity))
                    && o.changed_at.elapsed() <= o.duration
            })
        };
        let mut was = f.was_leader.lock().unwrap_or_else(|e| e.into_inner());
        if *was != leads {
            *was = leads;
            tracing::info!(
                leader = leads,
                lease = format!("{}/{}", f.cfg.namespace, f.cfg.name),
                identity = f.cfg.identity,
                "leadership changed (following kube-scheduler's Lease)"
            );
        }
        leads
    }

    /// Like [`Leadership::is_leader`], but when the watch says no, reads
    /// the Lease once more from the API server first: kube-scheduler calls
    /// Bind right after winning, possibly before our watch delivered the
    /// change.
    pub async fn confirm(&self) -> Result<bool> {
        if self.is_leader() {
            return Ok(true);
        }
        let Some(f) = &self.0 else {
            return Ok(true);
        };
        let leases: Api<Lease> = Api::namespaced(f.client.clone(), &f.cfg.namespace);
        let lease = leases
            .get_opt(&f.cfg.name)
            .await
            .map_err(|e| Error::api(format!("get lease {}/{}", f.cfg.namespace, f.cfg.name), e))?;
        f.observe(lease.as_ref());
        Ok(self.is_leader())
    }

    /// Who holds the followed Lease, as last seen (for error messages).
    pub fn holder(&self) -> Option<String> {
        let f = self.0.as_ref()?;
        let o = f.observed.lock().unwrap_or_else(|e| e.into_inner());
        o.as_ref().and_then(|o| o.holder.clone())
    }
}

impl Follower {
    fn observe(&self, lease: Option<&Lease>) {
        let mut o = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
            *o = None;
            return;
        };
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let renew_time = spec
            .renew_time
            .as_ref()
            .or(spec.acquire_time.as_ref())
            .map(|t| t.0);
        // A watch event that lags a fresher read (confirm) must not take
        // the view back in time.
        if let (Some(prev), Some(new)) = (o.as_ref().and_then(|p| p.renew_time), renew_time)
            && new < prev
        {
            return;
        }
        let duration = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
        );
        let unchanged = o
            .as_ref()
            .is_some_and(|p| p.holder == holder && p.renew_time == renew_time);
        let changed_at = match o.as_ref() {
            Some(p) if unchanged => p.changed_at,
            _ => Instant::now(),
        };
        *o = Some(Observed {
            holder,
            renew_time,
            duration,
            changed_at,
        });
    }
}

/// Follows the Lease until the returned task is aborted. The task ends
/// only if the watch stream does (it retries errors with backoff).
pub fn follow(client: Client, cfg: LeaseConfig) -> (Leadership, tokio::task::JoinHandle<()>) {
    let follower = Arc::new(Follower {
        cfg,
        client,
        observed: Mutex::new(None),
        was_leader: Mutex::new(false),
    });
    let f = follower.clone();
    let task = tokio::spawn(async move {
        let leases: Api<Lease> = Api::namespaced(f.client.clone(), &f.cfg.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", f.cfg.name));
        let stream = watcher::watcher(leases, config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut listed = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => listed = false,
                Ok(Event::InitApply(l) | Event::Apply(l)) => {
                    listed = true;
                    f.observe(Some(&l));
                }
                Ok(Event::Delete(_)) => f.observe(None),
                Ok(Event::InitDone) if !listed => f.observe(None),
                Ok(Event::InitDone) => {}
                Err(e) => tracing::warn!(error = %e, "watching the leader Lease; retrying"),
            }
        }
    });
    (Leadership(Some(follower)), task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_identity_is_host_name_then_uuid() {
        assert!(holder_is(
            "hami-scheduler-7d9f-abc_3f2a9c1e-1111-2222-3333-444455556666",
            "hami-scheduler-7d9f-abc"
        ));
        // Exact host name, not a prefix of another pod's.
        assert!(!holder_is("sched-10_3f2a", "sched-1"));
        assert!(!holder_is("sched-1_3f2a", "sched-10"));
        // An identity written without a uuid is compared whole.
        assert!(holder_is("replica-a", "replica-a"));
        assert!(!holder_is("replica-a", ""));
    }
}
