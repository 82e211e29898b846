//! The simulated cards and everything allocated or queued on them.

use crate::config::{self, DeviceSpec};
use crate::shared::{Card, Claim};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, OnceLock};

pub(crate) fn now_ns() -> u64 {
    hami_shm::region::monotonic_ns()
}

/// Sleeps until CLOCK_MONOTONIC reaches `t`.
pub(crate) fn sleep_until(t: u64) {
    loop {
        let now = now_ns();
        if now >= t {
            return;
        }
        std::thread::sleep(std::time::Duration::from_nanos(t - now));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Linear,
    Managed,
    Async,
    Physical,
    Array,
    Mipmap,
    IpcMapping,
    GraphMem,
    External,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Alloc {
    pub dev: usize,
    pub size: u64,
    pub kind: Kind,
}

/// A device's default memory pool (stream-ordered allocations): memory it
/// reserved from the card, of which `used` is handed out; the rest is kept
/// for reuse until a trim, or a synchronisation when above `threshold`.
#[derive(Default)]
pub(crate) struct Pool {
    pub reserved: u64,
    pub used: u64,
    pub threshold: u64,
}

pub(crate) struct Device {
    pub spec: DeviceSpec,
    /// Bytes this process holds on the card.
    pub used: u64,
    pub pool: Pool,
    /// When this process's queued work on the device ends (its contexts'
    /// synchronisation point).
    pub busy_until: u64,
    /// The card itself, shared with the other processes that simulate it.
    pub shared: Card,
    /// This process's memory slot on the shared card.
    pub slot: Claim,
}

impl Device {
    /// Memory booked on the card by every process.
    pub fn card_used(&self) -> u64 {
        self.shared.used(&self.slot)
    }

    fn book(&mut self, size: u64) -> bool {
        if !self.shared.reserve(size, self.spec.memory, &mut self.slot) {
            return false;
        }
        self.used += size;
        true
    }

    fn unbook(&mut self, size: u64) {
        self.used -= size;
        self.shared.release(size, &mut self.slot);
    }
}

/// A stream's tail while a kernel on it waits for a flag that no kernel
/// has set yet: unknown, i.e. never until released.
pub(crate) const BLOCKED: u64 = u64::MAX;

pub(crate) struct State {
    /// Every card, in NVML order.
    pub devices: Vec<Device>,
    /// CUDA ordinal -> index into `devices`, after `CUDA_VISIBLE_DEVICES`.
    pub visible: Vec<usize>,
    /// Freed address ranges by rounded size, reused like a real driver does
    /// (most recently freed first).
    free_addrs: HashMap<u64, Vec<u64>>,
    /// Streams whose work waits for a flag: stream -> (flag, device time
    /// queued behind the wait).
    pub blocked: HashMap<u64, (u32, u64)>,
    /// Flags set by kernels, with the time they were set.
    pub flags: HashMap<u32, u64>,
    /// Events recorded on a blocked stream: (event, stream).
    pub pending_events: Vec<(u64, u64)>,
    /// Every live allocation by its address or handle.
    pub allocs: BTreeMap<u64, Alloc>,
    next_addr: u64,
    /// Stream handle -> (device, time its last queued work ends).
    pub streams: HashMap<u64, (usize, u64)>,
    /// Event handle -> completion time once recorded.
    pub events: HashMap<u64, Option<u64>>,
    /// Graph handle -> device memory addresses of its memory nodes.
    pub graphs: HashMap<u64, Vec<u64>>,
    next_handle: u64,
}

impl State {
    /// An address range of `size` bytes, 512-aligned: the most recently
    /// freed range of that rounded size if any (real drivers reuse
    /// addresses at once), else a fresh one.
    pub fn new_addr(&mut self, size: u64) -> u64 {
        let rounded = size.div_ceil(512).max(1) * 512;
        if let Some(a) = self.free_addrs.get_mut(&rounded).and_then(Vec::pop) {
            return a;
        }
        let a = self.next_addr;
        self.next_addr += rounded + 512;
        a
    }

    fn recycle(&mut self, addr: u64, size: u64) {
        let rounded = size.div_ceil(512).max(1) * 512;
        self.free_addrs.entry(rounded).or_default().push(addr);
    }

    /// The device index of CUDA ordinal `ordinal`.
    pub fn internal(&self, ordinal: i32) -> Option<usize> {
        usize::try_from(ordinal)
            .ok()
            .and_then(|o| self.visible.get(o).copied())
    }

    /// The CUDA ordinal of device index `dev` (0 if CUDA cannot see it).
    pub fn ordinal(&self, dev: usize) -> i32 {
        self.visible.iter().position(|&d| d == dev).unwrap_or(0) as i32
    }

    /// What destroying (or resetting) the context of `dev` does: every
    /// allocation made on it is freed, its pool gives everything back.
    pub fn destroy_context(&mut self, dev: usize) {
        let addrs: Vec<u64> = self
            .allocs
            .iter()
            .filter(|(_, a)| a.dev == dev)
            .map(|(&addr, _)| addr)
            .collect();
        for a in addrs {
            let kind = self.allocs[&a].kind;
            self.give_back(a, &[kind]);
        }
        if let Some(d) = self.devices.get_mut(dev) {
            let reserved = d.pool.reserved;
            d.pool.used = 0;
            d.pool.reserved = 0;
            if reserved > 0 {
                d.unbook(reserved);
            }
        }
    }

    pub fn new_handle(&mut self) -> u64 {
        self.next_handle += 16;
        self.next_handle
    }

    /// Books `size` bytes on `dev` or reports out-of-memory.
    pub fn take(&mut self, dev: usize, size: u64, kind: Kind) -> Option<u64> {
        let d = self.devices.get_mut(dev)?;
        // Managed memory pages in and out: it can exceed the card and is
        // not resident memory. IPC mappings belong to the exporter.
        let resident = !matches!(kind, Kind::IpcMapping | Kind::Managed);
        if resident && !d.book(size) {
            return None;
        }
        let addr = self.new_addr(size);
        self.allocs.insert(addr, Alloc { dev, size, kind });
        Some(addr)
    }

    /// A stream-ordered allocation from `dev`'s pool: served from memory
    /// the pool keeps when it can, else the pool grows (or out-of-memory).
    pub fn pool_take(&mut self, dev: usize, size: u64) -> Option<u64> {
        let d = self.devices.get_mut(dev)?;
        let cached = d.pool.reserved - d.pool.used;
        if size > cached {
            let grow = size - cached;
            if !d.book(grow) {
                return None;
            }
            d.pool.reserved += grow;
        }
        d.pool.used += size;
        let addr = self.new_addr(size);
        self.allocs.insert(
            addr,
            Alloc {
                dev,
                size,
                kind: Kind::Async,
            },
        );
        Some(addr)
    }

    /// Gives pool memory back to the card down to `keep` bytes (and never
    /// below what is in use).
    pub fn pool_trim(&mut self, dev: usize, keep: u64) {
        if let Some(d) = self.devices.get_mut(dev) {
            let floor = d.pool.used.max(keep);
            if d.pool.reserved > floor {
                d.unbook(d.pool.reserved - floor);
                d.pool.reserved = floor;
            }
        }
    }

    /// What a synchronisation does: pools above their threshold shrink.
    pub fn settle_pools(&mut self) {
        for dev in 0..self.devices.len() {
            let keep = self.devices[dev].pool.threshold;
            self.pool_trim(dev, keep);
        }
    }

    /// Gives back an allocation of one of `kinds`.
    pub fn give_back(&mut self, addr: u64, kinds: &[Kind]) -> bool {
        match self.allocs.get(&addr) {
            Some(a) if kinds.contains(&a.kind) => {
                let a = self.allocs.remove(&addr).expect("present");
                self.recycle(addr, a.size);
                if a.kind == Kind::Async {
                    self.devices[a.dev].pool.used -= a.size;
                    return true;
                }
                if !matches!(a.kind, Kind::IpcMapping | Kind::Managed) {
                    self.devices[a.dev].unbook(a.size);
                }
                true
            }
            _ => false,
        }
    }

    /// Queues `dur_ns` of work on `stream` (0 = the device's null stream).
    /// Returns the time the work ends ([`BLOCKED`] behind a waiting kernel).
    pub fn occupy(&mut self, dev: usize, stream: u64, dur_ns: u64) -> u64 {
        self.occupy_after(dev, stream, dur_ns, 0)
    }

    /// [`State::occupy`], starting no earlier than `earliest`.
    fn occupy_after(&mut self, dev: usize, stream: u64, dur_ns: u64, earliest: u64) -> u64 {
        if let Some(b) = self.blocked.get_mut(&stream) {
            b.1 += dur_ns;
            return BLOCKED;
        }
        let now = now_ns();
        let stream_tail = if stream == 0 {
            0
        } else {
            self.streams.get(&stream).map_or(0, |s| s.1)
        };
        let d = &mut self.devices[dev];
        let (_, end) = d.shared.occupy(now.max(stream_tail).max(earliest), dur_ns);
        d.busy_until = d.busy_until.max(end);
        if let Some(s) = self.streams.get_mut(&stream) {
            s.1 = end;
        }
        end
    }

    /// A kernel on `stream` that runs `dur_ns` once `flag` is set: the
    /// stream is blocked until some kernel sets the flag (a later launch,
    /// typically on another stream: a producer/consumer pair). Does not
    /// occupy the card while it waits, so the setter can run.
    pub fn launch_wait(&mut self, dev: usize, stream: u64, flag: u32, dur_ns: u64) -> u64 {
        match self.flags.get(&flag) {
            Some(&t) => self.occupy_after(dev, stream, dur_ns, t),
            None => {
                if let Some(b) = self.blocked.get_mut(&stream) {
                    b.1 += dur_ns;
                } else {
                    self.blocked.insert(stream, (flag, dur_ns));
                }
                BLOCKED
            }
        }
    }

    /// A kernel ending at `t` sets `flag`: streams waiting for it run on.
    pub fn set_flag(&mut self, dev: usize, flag: u32, t: u64) {
        self.flags.insert(flag, t);
        let released: Vec<(u64, u64)> = self
            .blocked
            .iter()
            .filter(|(_, b)| b.0 == flag)
            .map(|(&st, b)| (st, b.1))
            .collect();
        for (st, backlog) in released {
            self.blocked.remove(&st);
            let sdev = self.streams.get(&st).map_or(dev, |s| s.0);
            let end = self.occupy_after(sdev, st, backlog, t);
            let mut done = Vec::new();
            self.pending_events.retain(|&(ev, s)| {
                if s == st {
                    done.push(ev);
                }
                s != st
            });
            for ev in done {
                if let Some(e) = self.events.get_mut(&ev) {
                    *e = Some(end);
                }
            }
        }
    }

    /// Whether any stream of `dev` waits for a flag.
    pub fn any_blocked(&self, dev: usize) -> bool {
        self.blocked
            .keys()
            .any(|st| *st == 0 || self.streams.get(st).is_none_or(|s| s.0 == dev))
    }

    /// When everything queued on `stream` is done ([`BLOCKED`]: not known).
    pub fn stream_tail(&self, dev: usize, stream: u64) -> u64 {
        if self.blocked.contains_key(&stream) {
            return BLOCKED;
        }
        match self.streams.get(&stream) {
            Some(s) => s.1,
            None => self.devices.get(dev).map_or(0, |d| d.busy_until),
        }
    }

    /// Percent of the last second `dev` was busy (all processes).
    pub fn utilization(&self, dev: usize) -> u32 {
        self.devices
            .get(dev)
            .map_or(0, |d| d.shared.utilization(now_ns()))
    }
}

static STATE: OnceLock<Mutex<State>> = OnceLock::new();

/// The process's simulation, created on first use.
pub(crate) fn state() -> MutexGuard<'static, State> {
    let m = STATE.get_or_init(|| {
        let specs = config::from_env();
        let key: String = specs
            .iter()
            .map(|s| format!("{} {} {} {};", s.memory, s.sms, s.uuid, s.name))
            .collect();
        let dir = crate::shared::state_dir(&key);
        let devices: Vec<Device> = specs
            .into_iter()
            .map(|spec| Device {
                shared: Card::open(Some(&dir), &spec.uuid),
                spec,
                used: 0,
                pool: Pool::default(),
                busy_until: 0,
                slot: Claim::default(),
            })
            .collect();
        let visible = visible_devices(&devices);
        FIRST_VISIBLE.store(visible.first().copied().unwrap_or(0), Relaxed);
        Mutex::new(State {
            devices,
            visible,
            free_addrs: HashMap::new(),
            blocked: HashMap::new(),
            flags: HashMap::new(),
            pending_events: Vec::new(),
            allocs: BTreeMap::new(),
            next_addr: 0x7f00_0000_0000,
            streams: HashMap::new(),
            events: HashMap::new(),
            graphs: HashMap::new(),
            next_handle: 0x5100_0000,
        })
    });
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The devices CUDA shows, as `CUDA_VISIBLE_DEVICES` says (indices or UUID
/// prefixes, comma-separated; like CUDA, the list ends at the first entry
/// that names no device or one already listed; empty = none). Unset: all.
/// NVML ignores it, as the real one does.
fn visible_devices(devices: &[Device]) -> Vec<usize> {
    let Ok(list) = std::env::var("CUDA_VISIBLE_DEVICES") else {
        return (0..devices.len()).collect();
    };
    let mut out = Vec::new();
    for e in list.split(',').map(str::trim) {
        let found = match e.parse::<usize>() {
            Ok(i) => (i < devices.len()).then_some(i),
            Err(_) if e.is_empty() => None,
            Err(_) => devices.iter().position(|d| d.spec.uuid.starts_with(e)),
        };
        match found {
            Some(i) if !out.contains(&i) => out.push(i),
            _ => break,
        }
    }
    out
}

thread_local! {
    /// The calling thread's current device (its context), as an index into
    /// `State::devices`; `usize::MAX` until set (then CUDA device 0).
    pub(crate) static CURRENT: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// `visible[0]`, set when the state is created (so reading it never
/// takes the state's lock).
static FIRST_VISIBLE: AtomicUsize = AtomicUsize::new(usize::MAX);

pub(crate) fn current_device() -> usize {
    match CURRENT.with(|c| c.get()) {
        usize::MAX => {
            if FIRST_VISIBLE.load(Relaxed) == usize::MAX {
                drop(state());
            }
            FIRST_VISIBLE.load(Relaxed)
        }
        d => d,
    }
}
