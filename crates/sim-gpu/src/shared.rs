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
//!   bytes back (out-of-memory). A process owns its slot by holding an
//!   open-file-description lock on the slot's byte of the state file, so a
//!   slot is live exactly while its process is: the kernel drops the lock
//!   when the process dies, and its memory stops counting at once, like the
//!   driver frees a dead process's memory. Locks, unlike pids, mean the same
//!   thing in every pid namespace: processes in containers (each numbering
//!   its processes from 1) and on the host share a card correctly.
//!
//! A process killed at any instant leaves at most a stale `used` in its own
//! slot (not counted; reset by the next owner) and a `busy_until` no later
//! than the work it queued: it can never wedge the device. When the file
//! cannot be created the device falls back to anonymous memory shared only
//! with forked children, whose slots are told live by their pids.

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

/// Slot locks sit past any data so they can never be confused with it
/// (advisory locks need no bytes behind them).
const LOCK_BASE: i64 = 1 << 40;

/// How a process holds its memory slot on one card.
#[derive(Default)]
pub(crate) struct Claim {
    /// The pid that claimed it: a forked child claims its own.
    pid: i32,
    slot: Option<usize>,
    /// The open file description holding the slot's lock (file-backed
    /// cards); dropping it releases the slot.
    _lock: Option<std::fs::File>,
}

impl Claim {
    /// The slot, when this process (not a parent before a fork) holds it.
    fn own(&self) -> Option<usize> {
        self.slot.filter(|_| self.pid == my_pid())
    }
}

/// `F_OFD_SETLK`/`F_OFD_GETLK` on the byte of `slot`: true when the
/// request succeeded (SETLK) or when some other open file description
/// holds the byte (GETLK).
fn slot_lock(f: &std::fs::File, cmd: libc::c_int, slot: usize) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed flock is valid; the fields are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = LOCK_BASE + slot as i64;
    fl.l_len = 1;
    // SAFETY: fcntl on an open fd with a valid flock pointer.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    match cmd {
        libc::F_OFD_GETLK => r == 0 && fl.l_type != libc::F_UNLCK as libc::c_short,
        _ => r == 0,
    }
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

/// One card as this process sees it: the shared state, and the state file
/// whose byte locks tell which slots are live.
pub(crate) struct Card {
    state: &'static SharedDevice,
    /// The state file (None: anonymous memory, pids tell liveness).
    path: Option<std::path::PathBuf>,
    /// An open file description holding no lock, to ask about others'.
    probe: Option<std::fs::File>,
}

impl std::ops::Deref for Card {
    type Target = SharedDevice;
    fn deref(&self) -> &SharedDevice {
        self.state
    }
}

impl Card {
    /// Maps the device's state file (or private memory if that fails).
    pub fn open(dir: Option<&std::path::Path>, uuid: &str) -> Card {
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
            let path = d.join(format!("{name}.v2"));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .ok()?;
            // Growing a zero file to its size is idempotent across racers.
            if f.metadata().ok()?.len() < size as u64 {
                f.set_len(size as u64).ok()?;
            }
            Some((f, path))
        });
        use std::os::fd::AsRawFd;
        let (flags, raw) = match &fd {
            Some((f, _)) => (libc::MAP_SHARED, f.as_raw_fd()),
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
        let file_backed = fd.is_some() && raw != -1 && flags == libc::MAP_SHARED;
        let (probe, path) = match fd {
            Some((f, path)) if file_backed => (Some(f), Some(path)),
            _ => (None, None),
        };
        Card {
            // SAFETY: page-aligned, zero-initialised or written only through
            // these atomics; the mapping lives as long as the process.
            state: unsafe { &*(p as *const SharedDevice) },
            path,
            probe,
        }
    }

    /// This process's slot, claimed on first use (and again in a forked
    /// child): on a file-backed card, the first slot whose byte lock it
    /// can take, reset to zero; else a free slot by pid.
    fn my_slot(&self, claim: &mut Claim) -> Option<usize> {
        let me = my_pid();
        if claim.pid == me && claim.slot.is_some() {
            return claim.slot;
        }
        let found = match &self.path {
            Some(path) => {
                // A fresh open file description: a forked child must not
                // share its parent's locks.
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .ok()?;
                let i = (0..SLOTS).find(|&i| slot_lock(&f, libc::F_OFD_SETLK, i))?;
                let s = &self.slots[i];
                s.used.store(0, SeqCst);
                s.pid.store(me, Release);
                *claim = Claim {
                    pid: me,
                    slot: Some(i),
                    _lock: Some(f),
                };
                Some(i)
            }
            None => {
                let free = |st: &SharedDevice| {
                    st.slots.iter().position(|s| {
                        s.pid.load(Acquire) == 0
                            && s.pid.compare_exchange(0, me, AcqRel, Acquire).is_ok()
                    })
                };
                let i = free(self).or_else(|| {
                    self.reclaim_dead();
                    free(self)
                })?;
                *claim = Claim {
                    pid: me,
                    slot: Some(i),
                    _lock: None,
                };
                Some(i)
            }
        };
        if let Some(i) = found {
            self.slot_hwm.fetch_max(i as u64 + 1, SeqCst);
        }
        found
    }

    /// Whether slot `i` belongs to a live process (`own`: this process's).
    fn live(&self, i: usize, own: Option<usize>) -> bool {
        if own == Some(i) {
            return true;
        }
        let pid = self.slots[i].pid.load(Acquire);
        if pid == 0 {
            return false;
        }
        match &self.probe {
            Some(f) => slot_lock(f, libc::F_OFD_GETLK, i),
            None => pid > 0 && alive(pid),
        }
    }

    /// Bytes held on the card by live processes.
    fn sum_used(&self, own: Option<usize>) -> u64 {
        self.live_slots()
            .iter()
            .enumerate()
            .filter(|(i, s)| s.used.load(SeqCst) > 0 && self.live(*i, own))
            .map(|(_, s)| s.used.load(SeqCst))
            .sum()
    }

    /// Books `size` bytes for this process unless the card (of `memory`
    /// bytes) cannot hold them: the process adds them to its own slot, then
    /// sums the live slots (so two racers never both fit where only one
    /// does), and takes them back when over.
    pub fn reserve(&self, size: u64, memory: u64, claim: &mut Claim) -> bool {
        let Some(i) = self.my_slot(claim) else {
            return false;
        };
        let slot = &self.slots[i];
        slot.used.fetch_add(size, SeqCst);
        if self.sum_used(Some(i)) > memory {
            slot.used.fetch_sub(size, SeqCst);
            return false;
        }
        true
    }

    /// Gives back `size` bytes this process had booked.
    pub fn release(&self, size: u64, claim: &mut Claim) {
        if let Some(i) = self.my_slot(claim) {
            let _ = self.slots[i]
                .used
                .fetch_update(SeqCst, SeqCst, |u| Some(u.saturating_sub(size)));
        }
    }

    /// Live processes holding memory on the card, with their usage (pids
    /// as each process saw itself, in its own pid namespace).
    pub fn processes(&self, claim: &Claim) -> Vec<(i32, u64)> {
        let own = claim.own();
        self.live_slots()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let pid = s.pid.load(Acquire);
                let used = s.used.load(SeqCst);
                (pid > 0 && used > 0 && self.live(i, own)).then_some((pid, used))
            })
            .collect()
    }

    /// Memory booked on the card by live processes.
    pub fn used(&self, claim: &Claim) -> u64 {
        self.sum_used(claim.own())
    }
}

impl SharedDevice {
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
        self.busy_percents(from, (now - from).max(1), 1)[0]
    }

    /// Percent each of `n` consecutive periods of `width` ns from `from`
    /// (CLOCK_MONOTONIC) the device was busy, all processes: one pass over
    /// the log.
    pub fn busy_percents(&self, from: u64, width: u64, n: usize) -> Vec<u32> {
        if width == 0 || n == 0 {
            return vec![0; n];
        }
        let to = from + width * n as u64;
        let mut busy = vec![0u64; n];
        for e in &self.log {
            let s = e.start.load(Acquire);
            let end = e.end.load(Acquire);
            if s == 0 || end <= s || e.start.load(Acquire) != s {
                continue;
            }
            let (s, end) = (s.max(from), end.min(to));
            let mut t = s;
            while t < end {
                let k = ((t - from) / width) as usize;
                let period_end = from + (k as u64 + 1) * width;
                busy[k] += end.min(period_end) - t;
                t = period_end;
            }
        }
        busy.into_iter()
            .map(|b| ((b * 100) / width).min(100) as u32)
            .collect()
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
}

/// The state directory: `SIM_GPU_STATE_DIR`, else in a container of
/// `hami-node --sim` the host's (mounted at
/// [`crate::config::CONTAINER_STATE`]), else one keyed by the uid and the
/// device list (`key`).
pub(crate) fn state_dir(key: &str) -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("SIM_GPU_STATE_DIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    let mounted = std::path::Path::new(crate::config::CONTAINER_STATE);
    if mounted.is_dir() {
        return mounted.into();
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
