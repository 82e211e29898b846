//! Compute quota: kernel launches are paced so that the container's share of
//! a device's time converges to `CUDA_DEVICE_SM_LIMIT` percent.
//!
//! # Algorithm: a shared virtual clock corrected by measured kernel time
//!
//! Each device has one virtual clock `C` in the shared region (CLOCK_MONOTONIC
//! ns), shared by every process of the container. With quota `q` (0 < q < 1),
//! a kernel that keeps the device busy for `d` ns "costs" `d / q` ns of wall
//! time. A launch at time `t`:
//!
//! 1. harvests finished measurements (below), correcting `C`;
//! 2. takes `s = max(C, t - B)` (`s = t` for a fresh clock) and sets
//!    `C = s + d_est / q` with one compare-and-swap (B = 50 ms of credit a
//!    container may bank while idle, so a launch that woke up late can
//!    catch up);
//! 3. sleeps until `s` if `s > t`, then launches, bracketed by two events on
//!    the caller's stream.
//!
//! It never waits for the device before a launch: measurements are
//! harvested with `cuEventQuery`, which does not block, and a launch never
//! waits for an earlier kernel to finish (a kernel may be waiting for this
//! very launch: stream-wait-value, persistent producer/consumer kernels).
//! The per-device lock guards only the bookkeeping; it is released before
//! the driver's launch is called, so threads launching on one device do not
//! serialise on it. Beyond [`MAX_IN_FLIGHT`] unfinished measurements the
//! oldest is retired: charged the current estimate, its events released.
//!
//! `d_est` is an exponential moving average (1/8) of this process's measured
//! kernel times on that device. When the event pair of a launch completes,
//! its measured time `d` replaces the estimate: `C += (d - d_est) / q`. So
//! every kernel is eventually charged exactly its measured time, whatever
//! the estimate was: the estimate only decides *when* the correction lands.
//! This is a generic cell-rate algorithm (a leaky bucket on device time) fed
//! back by measurement, not a token bucket refilled from ~1 s NVML samples.
//!
//! Expected error over a window of `T` seconds in which the container is
//! always ready to launch: `C` advances by exactly `busy / q`, and launches
//! never start earlier than `C - B`, so `|busy/T - q| <= (B + d_max + L) / T`
//! where `d_max` is the longest kernel and `L` the measurement lag (at most
//! 32 measurements in flight; beyond that the oldest is charged the
//! estimate instead). For `T = 3 s`, 1 ms kernels: about 1 point.
//!
//! # What a kernel is charged
//!
//! An event pair also times the kernel's wait for other work on the device.
//! Waits behind kernels of the *same* container must not be billed twice, so
//! a completed pair is placed on the host's clock (through a reference event
//! recorded on a private idle stream at a known CLOCK_MONOTONIC time,
//! renewed every 250 ms) and charged only for the part of its interval that
//! the container's earlier-recorded intervals do not cover
//! ([`hami_shm::region::SharedRegion::charge_interval`]): the container pays
//! for the union of its kernels' intervals, which on a card running one
//! kernel at a time is the device time it used. Waits behind *other*
//! containers are not in that log; the node agent corrects for them with
//! the device's charge scale (`DeviceEntry::charge_scale_ppm`): the part of
//! its measured time a container is charged.
//! Until the first measurement arrives `d_est` is 0: those launches are
//! charged when their measurements are harvested.
//!
//! Launches into a stream that is capturing a graph are passed straight
//! through (they do not run now; the graph is paced when it is launched).
//!
//! `GPU_CORE_UTILIZATION_POLICY=disable` turns pacing off; `force` paces
//! whenever the quota is below 100; `default` too, except while the node
//! agent says the container is alone on its cards (the region's
//! `FLAG_ALONE`): then launches are still measured but never held back. `CUDA_TASK_PRIORITY=1`
//! (the default) processes also hold their launches while the shared region's
//! suspend flag is set or the node agent's hold lease runs (each held launch logs
//! `launch held: low priority suspended ...` at info level,
//! `LIBCUDA_LOG_LEVEL=3`, before it starts waiting); priority-0 processes
//! record their last launch time there, for the node agent to see.

use crate::device::current_device;
use crate::ffi::*;
use crate::state::{Global, Process, global, process};
use hami_shm::region::monotonic_ns;
use std::collections::VecDeque;
use std::ffi::{c_uint, c_void};
use std::sync::Mutex;
use std::sync::atomic::{AtomicPtr, Ordering::*};

/// Credit a container may bank while it is idle or late (a launch that
/// wakes up late may catch up by this much), ns.
pub const BURST_NS: u64 = 50_000_000;
/// Measurements kept in flight; beyond, the oldest is charged the estimate.
const MAX_IN_FLIGHT: usize = 32;

/// How often the reference event is renewed (bounds the f32 precision of
/// `cuEventElapsedTime` from it: ~15 ns at 250 ms).
const REFERENCE_NS: u64 = 250_000_000;

/// A launch whose event pair has not been harvested yet.
struct Pending {
    start: usize,
    end: usize,
    /// What the virtual clock was charged at launch (the estimate), ns.
    charged: u64,
    /// The reference event (and its CLOCK_MONOTONIC time) that places the
    /// pair on the host's time line.
    reference: Option<(usize, u64)>,
}

#[derive(Default)]
struct Measuring {
    free_events: Vec<usize>,
    pending: VecDeque<Pending>,
    estimate_ns: u64,
    measured: u64,
    /// Our private non-blocking stream for reference events (0: none yet).
    stream: usize,
    /// The current reference event: recorded on the idle private stream at
    /// a known CLOCK_MONOTONIC time, so `t_ref + elapsed(ref, e)` is when
    /// event `e` completed on the host's clock.
    reference: Option<(usize, u64)>,
    /// Superseded reference events, until no pending pair uses them.
    old_references: Vec<usize>,
}

/// Per-process, per-device pacing state.
#[derive(Default)]
pub struct Pacer {
    m: Mutex<Measuring>,
}

impl Pacer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Measuring> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }
}

macro_rules! driver_fn {
    ($name:literal : $ty:ty) => {{
        static SLOT: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
        let p = crate::dl::resolve(&SLOT, concat!($name, "\0").as_bytes(), crate::dl::Lib::Cuda);
        // SAFETY: the driver's entry point of that name has this signature.
        (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, $ty>(p) })
    }};
}

type EvCreate = unsafe extern "C" fn(*mut usize, c_uint) -> CUresult;
type EvRecord = unsafe extern "C" fn(usize, usize) -> CUresult;
type EvOne = unsafe extern "C" fn(usize) -> CUresult;
type EvElapsed = unsafe extern "C" fn(*mut f32, usize, usize) -> CUresult;
type StreamCreate = unsafe extern "C" fn(*mut usize, c_uint) -> CUresult;

type IsCapturing = unsafe extern "C" fn(usize, *mut std::ffi::c_int) -> CUresult;

/// Whether `stream` is capturing a graph: then the launch is recorded, not
/// run, and must be neither delayed nor bracketed by our events (they would
/// become nodes of the program's graph). The graph is paced when launched.
fn capturing(stream: usize, ptds: bool) -> bool {
    let f = if ptds {
        driver_fn!("cuStreamIsCapturing_ptsz": IsCapturing)
    } else {
        driver_fn!("cuStreamIsCapturing": IsCapturing)
    };
    let Some(f) = f else { return false };
    let mut status = 0;
    // SAFETY: the caller's stream, our out pointer.
    (unsafe { f(stream, &mut status) }) == CUDA_SUCCESS && status != 0
}

fn event_record(ptds: bool) -> Option<EvRecord> {
    if ptds {
        driver_fn!("cuEventRecord_ptsz": EvRecord)
    } else {
        driver_fn!("cuEventRecord": EvRecord)
    }
}

impl Measuring {
    fn take_event(&mut self) -> Option<usize> {
        if let Some(e) = self.free_events.pop() {
            return Some(e);
        }
        let create = driver_fn!("cuEventCreate": EvCreate)?;
        let mut e = 0usize;
        // SAFETY: valid out pointer; flags 0 = timing enabled.
        (unsafe { create(&mut e, 0) } == CUDA_SUCCESS).then_some(e)
    }

    /// The reference event for a launch now, renewed every [`REFERENCE_NS`].
    fn reference(&mut self, rec: EvRecord) -> Option<(usize, u64)> {
        let now = monotonic_ns();
        if let Some((ev, t)) = self.reference {
            if now.saturating_sub(t) < REFERENCE_NS {
                return self.reference;
            }
            self.old_references.push(ev);
            self.reference = None;
        }
        if self.stream == 0 {
            let create = driver_fn!("cuStreamCreate": StreamCreate)?;
            let mut st = 0usize;
            // SAFETY: valid out pointer; 1 = CU_STREAM_NON_BLOCKING.
            if unsafe { create(&mut st, 1) } != CUDA_SUCCESS || st == 0 {
                return None;
            }
            self.stream = st;
        }
        let ev = self.take_event()?;
        let t = monotonic_ns();
        // SAFETY: our own event on our own (idle) stream.
        if unsafe { rec(ev, self.stream) } != CUDA_SUCCESS {
            self.free_events.push(ev);
            return None;
        }
        self.reference = Some((ev, t));
        self.reference
    }

    /// Forgets the reference and its stream (after a context change).
    fn drop_reference(&mut self) {
        if let Some((ev, _)) = self.reference.take() {
            self.free_events.push(ev);
        }
        if self.stream != 0 {
            if let Some(destroy) = driver_fn!("cuStreamDestroy_v2": EvOne) {
                // SAFETY: our own stream.
                unsafe { destroy(self.stream) };
            }
            self.stream = 0;
        }
    }

    fn drop_events(&mut self) {
        if let Some(destroy) = driver_fn!("cuEventDestroy_v2": EvOne) {
            for e in self.free_events.drain(..) {
                // SAFETY: our own event.
                unsafe { destroy(e) };
            }
        }
    }

    /// Applies every finished measurement, oldest first, up to the first
    /// unfinished one. Never blocks (`cuEventQuery`).
    fn harvest(&mut self, g: &Global, p: &Process, dev: usize, quota: u32) {
        let (Some(query), Some(elapsed)) = (
            driver_fn!("cuEventQuery": EvOne),
            driver_fn!("cuEventElapsedTime": EvElapsed),
        ) else {
            return;
        };
        while let Some(front) = self.pending.front() {
            // SAFETY: our own event.
            match unsafe { query(front.end) } {
                CUDA_SUCCESS => {}
                600 => break, // CUDA_ERROR_NOT_READY
                _ => {
                    let gone = self.pending.pop_front().expect("front");
                    self.free_events.extend([gone.start, gone.end]);
                    continue;
                }
            }
            let done = self.pending.pop_front().expect("front");
            let mut ms = 0f32;
            // SAFETY: our own events, both complete.
            if unsafe { elapsed(&mut ms, done.start, done.end) } == CUDA_SUCCESS {
                let span = (ms.max(0.0) as f64 * 1e6) as u64;
                let measured = own_time(g, dev, elapsed, &done, span);
                // What the container is charged: its measured time, less
                // the share the node agent found to be waits behind other
                // containers on the card.
                let own = measured * g.region.charge_scale_ppm(dev) / 1_000_000;
                let clock = &g.region.devices[dev].pacing_clock_ns;
                let q = quota.max(1) as u64;
                if own >= done.charged {
                    clock.fetch_add((own - done.charged) * 100 / q, AcqRel);
                } else {
                    let back = (done.charged - own) * 100 / q;
                    let _ = clock.fetch_update(AcqRel, Acquire, |c| Some(c.saturating_sub(back)));
                }
                self.estimate_ns = if self.measured == 0 {
                    own
                } else {
                    (self.estimate_ns * 7 + own) / 8
                };
                self.measured += 1;
                g.region.add_busy(p.slot, dev, measured);
            }
            self.free_events.push(done.start);
            self.free_events.push(done.end);
        }
        self.retire(g, p, dev, quota);
        self.recycle_references();
    }

    /// Beyond [`MAX_IN_FLIGHT`] unfinished measurements, the oldest are
    /// charged the current estimate (what they were charged at launch may
    /// have been less) and forgotten; their events are destroyed (legal
    /// while pending: the driver frees them once complete).
    fn retire(&mut self, g: &Global, p: &Process, dev: usize, quota: u32) {
        while self.pending.len() >= MAX_IN_FLIGHT {
            let old = self.pending.pop_front().expect("non-empty");
            let q = quota.max(1) as u64;
            if self.estimate_ns > old.charged {
                g.region.devices[dev]
                    .pacing_clock_ns
                    .fetch_add((self.estimate_ns - old.charged) * 100 / q, AcqRel);
            }
            g.region
                .add_busy(p.slot, dev, self.estimate_ns.max(old.charged));
            if let Some(destroy) = driver_fn!("cuEventDestroy_v2": EvOne) {
                // SAFETY: our own events, never used again.
                unsafe {
                    destroy(old.start);
                    destroy(old.end);
                }
            }
        }
    }

    /// Superseded references no pending pair needs any more are reused.
    fn recycle_references(&mut self) {
        let pending = &self.pending;
        let (keep, free): (Vec<usize>, Vec<usize>) = self.old_references.iter().partition(|&&r| {
            pending
                .iter()
                .any(|p| p.reference.is_some_and(|x| x.0 == r))
        });
        self.old_references = keep;
        self.free_events.extend(free);
    }
}

/// The device time a completed launch is charged: its event pair's span
/// `[end - span, end]` placed on the host's clock through the reference
/// event, minus what the container's intervals recorded before it already
/// cover (`SharedRegion::charge_interval`). Without a usable reference, the
/// whole span.
fn own_time(g: &Global, dev: usize, elapsed: EvElapsed, done: &Pending, span: u64) -> u64 {
    let Some((reference, t_ref)) = done.reference else {
        return span;
    };
    let mut ms = 0f32;
    // SAFETY: our own events, both complete.
    if unsafe { elapsed(&mut ms, reference, done.end) } != CUDA_SUCCESS {
        return span;
    }
    let end = (t_ref as i128 + (ms as f64 * 1e6) as i128).max(span as i128) as u64;
    g.region.charge_interval(dev, end - span, end)
}

fn sleep_ns(ns: u64) {
    std::thread::sleep(std::time::Duration::from_nanos(ns));
}

/// Holds a low-priority launch while the node agent suspends them. A launch
/// that has to wait says so once, at info level, before its first wait.
#[inline]
fn priority_gate(g: &Global) {
    if g.env.priority() == 0 {
        g.region
            .header
            .high_priority_launch_ns
            .store(monotonic_ns(), Relaxed);
        return;
    }
    if g.region.low_priority_held_now() {
        hold_while_suspended(g);
    }
}

#[cold]
fn hold_while_suspended(g: &Global) {
    hlog!(
        crate::log::INFO,
        "launch held: low priority suspended by the node agent"
    );
    while g.region.low_priority_held_now() {
        sleep_ns(1_000_000);
    }
}

/// Runs `launch` under the device's quota. `stream` is where the work goes,
/// `ptds` whether it is a per-thread-default-stream entry point.
#[inline]
fn paced(stream: usize, ptds: bool, launch: impl FnOnce() -> CUresult) -> CUresult {
    let g = global();
    g.note_launch();
    priority_gate(g);
    // For the node monitor's seconds-since-last-kernel, paced or not: the
    // coarse clock, written only when it moved (one cheap read per launch).
    if let Some(slot) = g.region.slots.get(process().slot) {
        let now = hami_shm::region::coarse_monotonic_ns();
        if slot.last_launch_ns.load(Relaxed) != now {
            slot.last_launch_ns.store(now, Relaxed);
        }
    }
    if !g.pacing_any() {
        return launch();
    }
    paced_slow(g, stream, ptds, launch)
}

#[cold]
fn paced_slow(
    g: &Global,
    stream: usize,
    ptds: bool,
    launch: impl FnOnce() -> CUresult,
) -> CUresult {
    let dev = current_device();
    let quota = g.sm_limit(dev);
    if quota >= 100 || dev >= hami_shm::MAX_DEVICES || capturing(stream, ptds) {
        return launch();
    }
    let p = process();
    let pacer = &p.pacers[dev];
    let estimate = {
        let mut m = pacer.lock();
        m.harvest(g, p, dev, quota);
        m.estimate_ns
    };

    // Alone on its cards under the default policy: measured, not held.
    if !g.alone_unpaced() {
        let clock = &g.region.devices[dev].pacing_clock_ns;
        let cost = estimate * 100 / quota as u64;
        let now = monotonic_ns();
        let mut c = clock.load(Acquire);
        let start = loop {
            // A fresh clock starts now: no credit for the time before the first launch.
            let s = if c == 0 {
                now
            } else {
                c.max(now.saturating_sub(BURST_NS))
            };
            match clock.compare_exchange_weak(c, s + cost, AcqRel, Acquire) {
                Ok(_) => break s,
                Err(actual) => c = actual,
            }
        };
        if start > now {
            sleep_ns(start - now);
        }
    }

    // The lock guards the bookkeeping only: the driver's launch is called
    // without it.
    let record = event_record(ptds);
    let events = {
        let mut m = pacer.lock();
        match (record, m.take_event(), m.take_event()) {
            (Some(rec), Some(a), Some(b)) => Some((rec, a, b)),
            (_, a, b) => {
                m.free_events.extend(a.into_iter().chain(b));
                None
            }
        }
    };
    let Some((rec, a, b)) = events else {
        return launch();
    };
    // SAFETY: our own event on the caller's stream.
    if unsafe { rec(a, stream) } != CUDA_SUCCESS {
        // Likely another context than the events': start a fresh pool.
        let mut m = pacer.lock();
        m.free_events.push(a);
        m.free_events.push(b);
        m.drop_reference();
        m.drop_events();
        drop(m);
        return launch();
    }
    let reference = pacer.lock().reference(rec);
    let r = launch();
    // SAFETY: as above.
    let recorded = r == CUDA_SUCCESS && unsafe { rec(b, stream) } == CUDA_SUCCESS;
    let mut m = pacer.lock();
    if recorded {
        m.pending.push_back(Pending {
            start: a,
            end: b,
            charged: estimate,
            reference,
        });
        if let Some(slot) = g.region.slots.get(p.slot) {
            slot.launches[dev].fetch_add(1, Relaxed);
        }
    } else {
        m.free_events.push(a);
        m.free_events.push(b);
    }
    r
}

type Launch = unsafe extern "C" fn(
    usize,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    c_uint,
    usize,
    *mut *mut c_void,
    *mut *mut c_void,
) -> CUresult;

/// Whether `real` is a per-thread-default-stream entry point.
fn is_ptds(real: *const (), ptds_hook_real: &AtomicPtr<c_void>) -> bool {
    std::ptr::eq(real, ptds_hook_real.load(Relaxed) as *const ())
}

#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn launch_kernel(
    real: Launch,
    f: usize,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shmem: c_uint,
    s: usize,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    let ptds = is_ptds(
        real as *const (),
        &crate::hooks::real_cuda::cuLaunchKernel_ptsz,
    );
    // SAFETY: forwarding the caller's arguments.
    paced(s, ptds, || unsafe {
        real(f, gx, gy, gz, bx, by, bz, shmem, s, params, extra)
    })
}

#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn launch_cooperative(
    real: unsafe extern "C" fn(
        usize,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        usize,
        *mut *mut c_void,
    ) -> CUresult,
    f: usize,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shmem: c_uint,
    s: usize,
    params: *mut *mut c_void,
) -> CUresult {
    let ptds = is_ptds(
        real as *const (),
        &crate::hooks::real_cuda::cuLaunchCooperativeKernel_ptsz,
    );
    // SAFETY: forwarding the caller's arguments.
    paced(s, ptds, || unsafe {
        real(f, gx, gy, gz, bx, by, bz, shmem, s, params)
    })
}

pub(crate) unsafe fn launch_kernel_ex(
    real: unsafe extern "C" fn(
        *const LaunchConfig,
        usize,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CUresult,
    cfg: *const LaunchConfig,
    f: usize,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    if cfg.is_null() {
        // SAFETY: let the driver report the caller's mistake.
        return unsafe { real(cfg, f, params, extra) };
    }
    // SAFETY: non-null, caller-owned.
    let s = unsafe { (*cfg).stream };
    let ptds = is_ptds(
        real as *const (),
        &crate::hooks::real_cuda::cuLaunchKernelEx_ptsz,
    );
    // SAFETY: forwarding the caller's arguments.
    paced(s, ptds, || unsafe { real(cfg, f, params, extra) })
}

pub(crate) unsafe fn graph_launch(
    real: unsafe extern "C" fn(usize, usize) -> CUresult,
    exec: usize,
    s: usize,
) -> CUresult {
    let ptds = is_ptds(
        real as *const (),
        &crate::hooks::real_cuda::cuGraphLaunch_ptsz,
    );
    // SAFETY: forwarding the caller's arguments.
    paced(s, ptds, || unsafe { real(exec, s) })
}
