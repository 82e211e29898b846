//! One simulated card shared by every process on the machine that uses it.
//!
//! Each device (by UUID) has a small state file, mapped `MAP_SHARED` by every
//! process that simulates it: `<dir>/<uuid>.v2` where `<dir>` is
//! `SIM_GPU_STATE_DIR`, else `<tmp>/sim-gpu-<uid>-<hash of the device list>`
//! (so processes with the same device list share their cards, and different
//! lists never collide). The file holds only atomics and all-zero is a fresh
//! card, so there is no initialisation race and no lock:
//!
//! * **the busy timeline**: `busy_until`, the time the device's queued work
//!   ends; a launch takes `start = max(now, busy_until, its stream's tail)`
//!   and moves `busy_until` to `start + duration` with one compare-and-swap.
//!   Kernels of all processes serialise on the device like on a real GPU
//!   (time-slicing between contexts, approximated at kernel granularity);
//! * **a log of recent busy intervals** (ring of [`LOG`] entries) from
//!   which NVML utilisation is computed, for all processes together;
//! * **memory**: per-process slots `(pid, used)`. An allocation adds to its
//!   process's slot, then sums the live slots; over the card it takes the
//!   bytes back (out-of-memory). A slot whose pid is gone is reclaimed by the
//!   next process that looks, like the driver frees a dead process's memory.
//!
//! A process killed at any instant leaves at most a stale `used` in its own
//! slot (reclaimed) and a `busy_until` no later than the work it queued: it
//! can never wedge the device. When the file cannot be created the device
//! falls back to private anonymous memory (each process its own card).

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::*};

/// Busy intervals kept for NVML utilisation.
pub(crate) const LOG: usize = 8192;
/// Processes that may hold memory on one simulated card at once.
pub(crate) const SLOTS: usize = 1024;

#[repr(C)]
pub(crate) struct Slot {
    pid: AtomicI32,
    _pad: u32,
    used: AtomicU64,
}

#[repr(C)]
pub(crate) struct Interval {
    start: AtomicU64,
    end: AtomicU64,
}

#[repr(C)]
pub(crate) struct SharedDevice {
    /// CLOCK_MONOTONIC ns at which the device's queued work ends.
    pub busy_until: AtomicU64,
    log_head: AtomicU64,
    /// One more than the highest memory slot ever claimed.
    slot_hwm: AtomicU64,
    slots: [Slot; SLOTS],
    log: [Interval; LOG],
}

fn alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn my_pid() -> i32 {
    std::process::id() as i32
}

impl SharedDevice {
    /// Maps the device's state file (or private memory if that fails).
    pub fn open(dir: Option<&std::path::Path>, uuid: &str) -> &'static SharedDevice {
        let size = std::mem::size_of::<SharedDevice>();
        let fd = dir.and_then(|d| {
            std::fs::create_dir_all(d).ok()?;
            let name: String = uuid
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(d.join(format!("{name}.v2")))
                .ok()?;
            // Growing a zero file to its size is idempotent across racers.
            if f.metadata().ok()?.len() < size as u64 {
                f.set_len(size as u64).ok()?;
            }
            Some(f)
        });
        use std::os::fd::AsRawFd;
        let (flags, raw) = match &fd {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping of `size` bytes; the file is at least that long.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                0,
            )
        };
        let p = if p == libc::MAP_FAILED && fd.is_some() {
            // SAFETY: as above, private anonymous memory (this process's own card).
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            }
        } else {
            p
        };
        assert!(p != libc::MAP_FAILED, "sim-gpu: cannot map device state");
        // SAFETY: page-aligned, zero-initialised or written only through
        // these atomics; the mapping lives as long as the process.
        unsafe { &*(p as *const SharedDevice) }
    }

    /// Queues `dur` ns of work that may start at `earliest` at the
    /// soonest; returns its (start, end).
    pub fn occupy(&self, earliest: u64, dur: u64) -> (u64, u64) {
        let mut cur = self.busy_until.load(Acquire);
        let start = loop {
            let s = earliest.max(cur);
            match self
                .busy_until
                .compare_exchange_weak(cur, s + dur, AcqRel, Acquire)
            {
                Ok(_) => break s,
                Err(c) => cur = c,
            }
        };
        let i = self.log_head.fetch_add(1, Relaxed) as usize % LOG;
        let e = &self.log[i];
        e.start.store(0, Release);
        e.end.store(start + dur, Release);
        e.start.store(start.max(1), Release);
        (start, start + dur)
    }

    /// Percent of the last second the device was busy, all processes.
    pub fn utilization(&self, now: u64) -> u32 {
        let from = now.saturating_sub(1_000_000_000);
        let mut busy = 0u64;
        for e in &self.log {
            let s = e.start.load(Acquire);
            let end = e.end.load(Acquire);
            if s == 0 || end <= s || e.start.load(Acquire) != s {
                continue;
            }
            busy += end.min(now).saturating_sub(s.max(from));
        }
        ((busy * 100) / 1_000_000_000).min(100) as u32
    }

    /// This process's memory slot (index cached in `hint`), claimed on
    /// first use.
    fn my_slot(&self, hint: &mut Option<usize>) -> Option<&Slot> {
        let me = my_pid();
        if let Some(i) = *hint
            && self.slots[i].pid.load(Acquire) == me
        {
            return Some(&self.slots[i]);
        }
        let found = self
            .slots
            .iter()
            .position(|s| s.pid.load(Acquire) == me)
            .or_else(|| {
                self.slots.iter().position(|s| {
                    s.pid.load(Acquire) == 0
                        && s.pid.compare_exchange(0, me, AcqRel, Acquire).is_ok()
                })
            });
        if let Some(i) = found {
            self.slot_hwm.fetch_max(i as u64 + 1, SeqCst);
        }
        *hint = found;
        let s = &self.slots[found?];
        Some(s)
    }

    /// Frees the slots of processes that are gone. A slot being reclaimed
    /// holds the negated pid of its reclaimer; one whose reclaimer died is
    /// taken over by the next.
    fn reclaim_dead(&self) {
        let me = my_pid();
        for s in self.live_slots() {
            let pid = s.pid.load(Acquire);
            if pid == 0 || pid == me || alive(pid.abs()) {
                continue;
            }
            if s.pid.compare_exchange(pid, -me, AcqRel, Acquire).is_ok() {
                s.used.store(0, SeqCst);
                s.pid.store(0, Release);
            }
        }
    }

    fn live_slots(&self) -> &[Slot] {
        let hwm = (self.slot_hwm.load(SeqCst) as usize).min(SLOTS);
        &self.slots[..hwm]
    }

    fn sum_used(&self) -> u64 {
        self.live_slots()
            .iter()
            .filter(|s| s.pid.load(Acquire) != 0)
            .map(|s| s.used.load(SeqCst))
            .sum()
    }

    /// Books `size` bytes for this process unless the card (of `memory`
    /// bytes) cannot hold them: the process adds them to its own slot, then
    /// sums all slots (so two racers never both fit where only one does);
    /// over the card it reclaims dead processes' slots and looks again.
    pub fn reserve(&self, size: u64, memory: u64, hint: &mut Option<usize>) -> bool {
        let Some(slot) = self.my_slot(hint).or_else(|| {
            self.reclaim_dead();
            self.my_slot(hint)
        }) else {
            return false;
        };
        slot.used.fetch_add(size, SeqCst);
        if self.sum_used() > memory {
            self.reclaim_dead();
            if self.sum_used() > memory {
                slot.used.fetch_sub(size, SeqCst);
                return false;
            }
        }
        true
    }

    /// Gives back `size` bytes this process had booked.
    pub fn release(&self, size: u64, hint: &mut Option<usize>) {
        if let Some(slot) = self.my_slot(hint) {
            let _ = slot
                .used
                .fetch_update(SeqCst, SeqCst, |u| Some(u.saturating_sub(size)));
        }
    }

    /// Live processes holding memory on the card, with their usage.
    pub fn processes(&self) -> Vec<(i32, u64)> {
        self.reclaim_dead();
        self.live_slots()
            .iter()
            .filter_map(|s| {
                let pid = s.pid.load(Acquire);
                let used = s.used.load(SeqCst);
                (pid > 0 && used > 0).then_some((pid, used))
            })
            .collect()
    }

    /// Memory booked on the card by live processes.
    pub fn used(&self) -> u64 {
        self.reclaim_dead();
        self.sum_used()
    }
}

/// The state directory: `SIM_GPU_STATE_DIR`, else one keyed by the uid and
/// the device list (`key`).
pub(crate) fn state_dir(key: &str) -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("SIM_GPU_STATE_DIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    // FNV-1a: stable across builds (std's hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    // SAFETY: getuid never fails.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("sim-gpu-{uid}-{h:016x}"))
}
