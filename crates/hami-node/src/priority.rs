//! Task priority across containers (`CUDA_TASK_PRIORITY`): while a
//! priority-0 container launches kernels on a card, the low-priority
//! containers on that card hold their launches; they resume once it has
//! been idle for `--priority-idle`.
//!
//! Each priority-0 process writes the time of its launches into its own
//! container's region; each low-priority process, before every launch,
//! reads its own region's hold lease (`low_priority_hold_until_ns`). The
//! relay joins the two: every millisecond it reads the high-priority
//! regions' launch times (`pread`, 8 bytes each) and renews, or drops,
//! the lease of the low-priority regions on the same cards (`pwrite`).
//! Which region is on which card and of which priority comes from the
//! monitor's scans ([`crate::monitor::Scan::priority`]).
//!
//! Why not one node-wide region every container maps: a file every tenant
//! can write is a file any tenant can truncate, and every other tenant's
//! process that maps it dies of SIGBUS. Here each container writes only
//! its own region, and the agent never maps any. Why a lease and not a
//! flag: an agent that dies pauses nobody for longer than one lease.
//! The loop sleeps (waiting for the next scan) whenever no card has both a
//! high-priority and a low-priority container.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use hami_shm::copy;

/// One region as the relay needs it (from a monitor scan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorityRegion {
    pub path: PathBuf,
    /// The UUIDs of the cards the container's processes used.
    pub cards: Vec<String>,
    /// A priority-0 process has a slot, or one launched.
    pub high: bool,
    /// A process of another priority has a slot, or no process has one yet.
    pub low: bool,
}

struct Entry {
    file: std::fs::File,
    region: PriorityRegion,
    /// The lease written last (0: none).
    held_until: u64,
}

/// A lease runs this long; it is renewed when half is left.
pub const LEASE_NS: u64 = 50_000_000;

/// The relay's state.
pub struct Relay {
    idle_ns: u64,
    entries: HashMap<PathBuf, Entry>,
    /// Some card has both a high- and a low-priority region (as of the
    /// last [`Relay::update`]).
    shared_card: bool,
}

/// A low-priority region held or released at a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: PathBuf,
    pub held: bool,
}

impl Relay {
    pub fn new(idle: Duration) -> Relay {
        Relay {
            idle_ns: idle.as_nanos() as u64,
            entries: HashMap::new(),
            shared_card: false,
        }
    }

    /// Takes a scan's regions: opens new ones, forgets those gone.
    pub fn update(&mut self, regions: Vec<PriorityRegion>) {
        let keep: BTreeSet<PathBuf> = regions.iter().map(|r| r.path.clone()).collect();
        self.entries.retain(|p, _| keep.contains(p));
        for r in regions {
            if let Some(e) = self.entries.get_mut(&r.path) {
                e.region = r;
                continue;
            }
            match copy::open_region_file(&r.path) {
                Ok(file) => {
                    self.entries.insert(
                        r.path.clone(),
                        Entry {
                            file,
                            region: r,
                            held_until: 0,
                        },
                    );
                }
                Err(e) => tracing::debug!(file = %r.path.display(), "priority relay: {e}"),
            }
        }
        let cards = |high: bool| -> BTreeSet<&String> {
            self.entries
                .values()
                .filter(|e| if high { e.region.high } else { e.region.low })
                .flat_map(|e| &e.region.cards)
                .collect()
        };
        self.shared_card = !cards(true).is_disjoint(&cards(false));
    }

    /// Whether ticks can change anything: a card has both a high- and a
    /// low-priority region, or a lease is still out.
    pub fn active(&self) -> bool {
        self.shared_card || self.entries.values().any(|e| e.held_until != 0)
    }

    /// One pass at CLOCK_MONOTONIC `now_ns`.
    pub fn tick(&mut self, now_ns: u64) -> Vec<Change> {
        let mut busy: BTreeSet<String> = BTreeSet::new();
        for e in self.entries.values().filter(|e| e.region.high) {
            let last = copy::read_high_priority_launch(&e.file);
            if last != 0 && now_ns.saturating_sub(last) <= self.idle_ns {
                busy.extend(e.region.cards.iter().cloned());
            }
        }
        let mut changes = Vec::new();
        for e in self.entries.values_mut() {
            let want = e.region.low && e.region.cards.iter().any(|c| busy.contains(c));
            let was = e.held_until != 0;
            let write = if want {
                // Renew when half the lease is left.
                (e.held_until.saturating_sub(now_ns) < LEASE_NS / 2).then_some(now_ns + LEASE_NS)
            } else {
                // Release at once rather than let the lease run out.
                (e.held_until != 0).then_some(0)
            };
            let Some(until) = write else { continue };
            match copy::write_hold_until(&e.file, until) {
                Ok(()) => {
                    e.held_until = until;
                    if want != was {
                        changes.push(Change {
                            path: e.region.path.clone(),
                            held: want,
                        });
                    }
                }
                Err(err) => {
                    tracing::warn!(file = %e.region.path.display(), "priority relay: {err}")
                }
            }
        }
        changes
    }

    /// Runs the relay until `plans` closes: a tick every millisecond while
    /// [`Relay::active`], else waits for the next plan.
    pub fn run(mut self, plans: mpsc::Receiver<Vec<PriorityRegion>>) {
        loop {
            let next = if self.active() {
                plans.recv_timeout(Duration::from_millis(1))
            } else {
                plans.recv_timeout(Duration::from_secs(3600))
            };
            match next {
                Ok(mut plan) => {
                    // Only the latest plan matters.
                    while let Ok(p) = plans.try_recv() {
                        plan = p;
                    }
                    self.update(plan);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            for c in self.tick(hami_shm::region::monotonic_ns()) {
                if c.held {
                    tracing::info!(region = %c.path.display(), "holding low-priority launches: a high-priority container is busy on the card");
                } else {
                    tracing::info!(region = %c.path.display(), "resuming low-priority launches");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hami_shm::region::SharedRegion;
    use std::sync::atomic::Ordering::SeqCst;

    fn region(dir: &std::path::Path, name: &str) -> (SharedRegion, PathBuf) {
        let path = dir.join(name);
        (SharedRegion::open(&path).unwrap(), path)
    }

    fn entry(path: &std::path::Path, card: &str, high: bool) -> PriorityRegion {
        PriorityRegion {
            path: path.to_path_buf(),
            cards: vec![card.to_string()],
            high,
            low: !high,
        }
    }

    #[test]
    fn low_priority_on_the_busy_card_is_held_until_the_card_is_idle() {
        let tmp = tempfile::tempdir().unwrap();
        let (high, hp) = region(tmp.path(), "high.cache");
        let (low, lp) = region(tmp.path(), "low.cache");
        let (other, op) = region(tmp.path(), "other.cache");
        let mut relay = Relay::new(Duration::from_millis(100));
        relay.update(vec![
            entry(&hp, "GPU-a", true),
            entry(&lp, "GPU-a", false),
            entry(&op, "GPU-b", false),
        ]);
        assert!(relay.active());
        let t0 = hami_shm::region::monotonic_ns();
        // Nothing launched yet: nobody held.
        assert!(relay.tick(t0).is_empty());
        assert!(!low.low_priority_held(t0));
        // A high-priority launch: the same card's low region is held, the
        // other card's is not.
        high.header.high_priority_launch_ns.store(t0, SeqCst);
        let c = relay.tick(t0 + 1);
        assert_eq!(
            c,
            vec![Change {
                path: lp.clone(),
                held: true
            }]
        );
        assert!(low.low_priority_held(t0 + 1));
        assert!(!other.low_priority_held(t0 + 1));
        // The lease is renewed while the card stays busy ...
        let later = t0 + 90_000_000;
        assert!(relay.tick(later).is_empty());
        assert!(low.low_priority_held(later));
        // ... and dropped once it has been idle for 100 ms.
        let idle = t0 + 100_000_001;
        let c = relay.tick(idle);
        assert_eq!(
            c,
            vec![Change {
                path: lp.clone(),
                held: false
            }]
        );
        assert!(!low.low_priority_held(idle));
        assert!(!relay.active() || relay.entries.values().all(|e| e.held_until == 0));
    }

    #[test]
    fn a_lease_left_behind_runs_out_by_itself() {
        let tmp = tempfile::tempdir().unwrap();
        let (high, hp) = region(tmp.path(), "high.cache");
        let (low, lp) = region(tmp.path(), "low.cache");
        let mut relay = Relay::new(Duration::from_secs(10));
        relay.update(vec![entry(&hp, "GPU-a", true), entry(&lp, "GPU-a", false)]);
        let t0 = hami_shm::region::monotonic_ns();
        high.header.high_priority_launch_ns.store(t0, SeqCst);
        relay.tick(t0);
        // The agent stops here (crash): the container resumes one lease later.
        drop(relay);
        assert!(low.low_priority_held(t0 + LEASE_NS - 1));
        assert!(!low.low_priority_held(t0 + LEASE_NS));
    }
}
