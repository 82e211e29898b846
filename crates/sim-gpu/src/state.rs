//! The simulated cards and everything allocated or queued on them.

use crate::config::{self, DeviceSpec};
use crate::shared::SharedDevice;
use std::collections::{BTreeMap, HashMap};
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
    pub shared: &'static SharedDevice,
    /// This process's memory slot on the shared card.
    slot: Option<usize>,
}

impl Device {
    /// Memory booked on the card by every process.
    pub fn card_used(&self) -> u64 {
        self.shared.used()
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

pub(crate) struct State {
    pub devices: Vec<Device>,
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
    /// A fresh address range of `size` bytes, 512-aligned, never reused.
    pub fn new_addr(&mut self, size: u64) -> u64 {
        let a = self.next_addr;
        self.next_addr += size.div_ceil(512).max(1) * 512 + 512;
        a
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
    /// Returns the time the work ends.
    pub fn occupy(&mut self, dev: usize, stream: u64, dur_ns: u64) -> u64 {
        let now = now_ns();
        let stream_tail = if stream == 0 {
            0
        } else {
            self.streams.get(&stream).map_or(0, |s| s.1)
        };
        let d = &mut self.devices[dev];
        let (_, end) = d.shared.occupy(now.max(stream_tail), dur_ns);
        d.busy_until = d.busy_until.max(end);
        if let Some(s) = self.streams.get_mut(&stream) {
            s.1 = end;
        }
        end
    }

    /// When everything queued on `stream` is done.
    pub fn stream_tail(&self, dev: usize, stream: u64) -> u64 {
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
        let devices = specs
            .into_iter()
            .map(|spec| Device {
                shared: SharedDevice::open(Some(&dir), &spec.uuid),
                spec,
                used: 0,
                pool: Pool::default(),
                busy_until: 0,
                slot: None,
            })
            .collect();
        Mutex::new(State {
            devices,
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

thread_local! {
    /// The calling thread's current device (its context), as in CUDA.
    pub(crate) static CURRENT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

pub(crate) fn current_device() -> usize {
    CURRENT.with(|c| c.get())
}
