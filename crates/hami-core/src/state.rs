//! The interposer's state: what is global to the process image (env, the
//! mapped shared region) and what belongs to one process (its slot, its
//! allocations, its pacers), which a forked child rebuilds for itself.
//!
//! Nothing here runs in a fork or exit path: the `pthread_atfork` child
//! handler only stores one atomic flag, and the child rebuilds its state the
//! next time it calls a hook.

use crate::log::{self, ERROR, INFO, WARN};
use crate::pacing::Pacer;
use hami_shm::MAX_DEVICES;
use hami_shm::env::{CorePolicy, InterposerEnv};
use hami_shm::region::{self, OverLimit, SharedRegion};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, Ordering::*};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// What an accounted handle is, so handle spaces never collide.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Kind {
    Linear,
    /// From a stream-ordered pool; the value holds the pool, not a size.
    Pool,
    Physical,
    Array,
    Mipmap,
    Ipc,
    External,
    GraphMem,
}

/// One accounted handle.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    /// Container device index.
    pub dev: usize,
    /// Bytes counted (for `Kind::Pool`: the pool the memory came from).
    pub bytes: u64,
    /// The context it was allocated in (what `cuCtxDestroy` frees); 0 unknown.
    pub ctx: usize,
}

/// This process's accounted allocations.
#[derive(Default)]
pub(crate) struct Tracker {
    pub map: HashMap<(Kind, u64), Entry>,
    /// Graph -> the memory-node allocations it owns.
    pub graphs: HashMap<usize, Vec<u64>>,
    /// Stream-ordered pool -> (device, bytes of its reservation counted).
    pub pools: HashMap<usize, (usize, u64)>,
}

pub(crate) struct Global {
    pub env: InterposerEnv,
    pub region: SharedRegion,
    seen_generation: AtomicU64,
    pacing_any: AtomicBool,
    last_poll_ns: AtomicU64,
    limits_stamp: AtomicU64,
    limits_writable_warned: AtomicBool,
    launches: AtomicU64,
    /// The node agent mounted a limits dir for this container (so its
    /// limits file is due), and the file is not there: device memory is
    /// refused until it is (fail closed).
    limits_missing: AtomicBool,
    limits_missing_warned: AtomicBool,
    limits_required: bool,
}

pub(crate) struct Process {
    pub pid: i32,
    pub slot: usize,
    tracker: Mutex<Tracker>,
    pub pacers: [Pacer; MAX_DEVICES],
    last_reclaim_ns: AtomicU64,
    /// Attempts left to learn the host pid (`crate::hostpid`).
    pub host_pid_tries: std::sync::atomic::AtomicU32,
}

static GLOBAL: OnceLock<Global> = OnceLock::new();
static PROCESS: AtomicPtr<Process> = AtomicPtr::new(std::ptr::null_mut());
/// This process's pid: set before the first `Process` is made and by the
/// `pthread_atfork` child handler, so reading it costs one atomic load (no
/// `getpid` system call per hook). The state in `PROCESS` is ours only if
/// its pid is this one: every thread of a forked child sees the new pid at
/// once, so none can use the parent's slot while another builds the
/// child's state.
static MY_PID: AtomicI32 = AtomicI32::new(0);

unsafe extern "C" {
    fn pthread_atfork(
        prepare: Option<unsafe extern "C" fn()>,
        parent: Option<unsafe extern "C" fn()>,
        child: Option<unsafe extern "C" fn()>,
    ) -> libc::c_int;
}

/// Runs in the child right after `fork`: `getpid` (async-signal-safe) and
/// one atomic store, nothing else.
unsafe extern "C" fn after_fork_in_child() {
    // SAFETY: getpid has no preconditions.
    MY_PID.store(unsafe { libc::getpid() }, Release);
}

fn my_pid() -> i32 {
    let pid = MY_PID.load(Acquire);
    if pid != 0 {
        return pid;
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let _ = MY_PID.compare_exchange(0, pid, AcqRel, Acquire);
    MY_PID.load(Acquire)
}

pub(crate) fn global() -> &'static Global {
    GLOBAL.get_or_init(init_global)
}

/// The file `name` in the directory this library was loaded from, when
/// it exists: the node agent mounts the library and the limits file side
/// by side (`<hook>/vgpu/`), so a process started without the container's
/// environment finds its limits whatever the hook path.
fn beside_this_library(name: &str) -> Option<std::path::PathBuf> {
    let path = this_library_dir()?.join(name);
    path.is_file().then_some(path)
}

/// The directory this library was loaded from.
fn this_library_dir() -> Option<std::path::PathBuf> {
    // SAFETY: a zeroed Dl_info is valid; dladdr fills it for an address
    // inside this library (this function's own).
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let found = unsafe { libc::dladdr(this_library_dir as *const libc::c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated path owned by the loader.
    let me = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) };
    use std::os::unix::ffi::OsStrExt as _;
    std::path::Path::new(std::ffi::OsStr::from_bytes(me.to_bytes()))
        .parent()
        .map(std::path::Path::to_path_buf)
}

/// The dir beside this library where the node agent mounts a container's
/// limits dir (`<hook>/vgpu/limits`), when it exists.
fn limits_dir_beside_this_library() -> Option<std::path::PathBuf> {
    let dir = this_library_dir()?.join(LIMITS_DIR_NAME);
    dir.is_dir().then_some(dir)
}

/// Name of the limits dir the node agent mounts beside the library.
const LIMITS_DIR_NAME: &str = "limits";

fn init_global() -> Global {
    let mut warnings = Vec::new();
    let mut env = InterposerEnv::from_process(&mut warnings);
    let limits_dir = limits_dir_beside_this_library();
    if std::env::var_os(hami_shm::env::LIMITS_FILE).is_none() {
        // Where the agent puts the file: beside the library (HAMi's
        // layout), else in the limits dir it mounted there.
        if let Some(p) = beside_this_library(hami_shm::limits::FILE_NAME) {
            env.limits_file = p;
        } else if let Some(d) = &limits_dir {
            env.limits_file = d.join(hami_shm::limits::FILE_NAME);
        }
    }
    // The node agent's limits file names the container's region: a process
    // started without the container's environment (`env -i`, ssh) joins
    // the container's accounting instead of counting alone.
    // It also lists the container's cards in device order, which wins over
    // the environment's list (every card of the node, when the agent
    // allocates without the node lock).
    if let Ok(text) = std::fs::read_to_string(&env.limits_file) {
        if let Some(p) = hami_shm::limits::shared_cache(&text) {
            env.shared_cache = p;
        }
        if let Some(cards) = hami_shm::limits::visible_devices(&text) {
            env.nvidia_visible_devices = Some(cards);
        }
    }
    log::LEVEL.store(env.log_level, Relaxed);
    for w in &warnings {
        hlog!(WARN, "{w}");
    }
    let region = match SharedRegion::open(&env.shared_cache) {
        Ok(r) => r,
        Err(e) => {
            hlog!(
                ERROR,
                "{e} ({}); limits apply to this process only",
                env.shared_cache.display()
            );
            match SharedRegion::anonymous() {
                Ok(r) => r,
                Err(e) => {
                    // Nothing sensible is left: an unusable mapping would make
                    // every hook fail. Abort loudly rather than mis-account.
                    hlog!(ERROR, "cannot map any shared region: {e}");
                    std::process::abort();
                }
            }
        }
    };
    // Once per program image: a slot holding our pid is from the image we
    // were exec'ed from; its memory went with it.
    // SAFETY: getpid has no preconditions.
    region.release_stale(unsafe { libc::getpid() });
    // The env seeds limits the region does not have yet; the limits file
    // and the node agent override them.
    region.apply_limits(&env.limits, false);
    let g = Global {
        env,
        region,
        seen_generation: AtomicU64::new(u64::MAX),
        pacing_any: AtomicBool::new(false),
        last_poll_ns: AtomicU64::new(0),
        limits_stamp: AtomicU64::new(0),
        limits_writable_warned: AtomicBool::new(false),
        launches: AtomicU64::new(0),
        limits_missing: AtomicBool::new(false),
        limits_missing_warned: AtomicBool::new(false),
        limits_required: limits_dir.is_some(),
    };
    g.reload_limits_file(true);
    // SAFETY: registering a handler that only stores an atomic.
    unsafe { pthread_atfork(None, None, Some(after_fork_in_child)) };
    hlog!(
        INFO,
        "initialised: region {}, device 0 limit {} bytes, sm {}%",
        g.env.shared_cache.display(),
        g.region.memory_limit(0).unwrap_or(0),
        g.region.sm_limit(0).unwrap_or(100)
    );
    g
}

impl Global {
    /// Memory limit of `dev` in bytes, 0 = none.
    pub fn memory_limit(&self, dev: usize) -> u64 {
        self.region.memory_limit(dev).unwrap_or(0)
    }

    /// Compute share of `dev` in percent, 100 = unpaced.
    pub fn sm_limit(&self, dev: usize) -> u32 {
        if self.env.core_policy == CorePolicy::Disable {
            return 100;
        }
        self.region.sm_limit(dev).unwrap_or(100)
    }

    /// `GPU_CORE_UTILIZATION_POLICY=default` and the node agent says the
    /// container is alone on its cards: nobody to share with, so launches
    /// are measured (for the monitor) but never held back.
    #[inline]
    pub fn alone_unpaced(&self) -> bool {
        self.env.core_policy == CorePolicy::Default && self.region.alone()
    }

    /// Whether any device needs pacing; cheap (one atomic load when the
    /// limits have not changed).
    #[inline]
    pub fn pacing_any(&self) -> bool {
        let g = self.region.header.limits_generation.load(Acquire);
        if g != self.seen_generation.load(Relaxed) {
            let any = (0..MAX_DEVICES).any(|d| self.sm_limit(d) < 100);
            self.pacing_any.store(any, Relaxed);
            self.seen_generation.store(g, Relaxed);
        }
        self.pacing_any.load(Relaxed)
    }

    /// Counts a launch; every 1024th polls the limits file.
    #[inline]
    pub fn note_launch(&self) {
        if self.launches.fetch_add(1, Relaxed) & 1023 == 1023 {
            self.poll_limits_file();
        }
    }

    /// Re-reads the limits file when it changed, at most every 250 ms.
    pub fn poll_limits_file(&self) {
        let now = region::monotonic_ns();
        let last = self.last_poll_ns.load(Relaxed);
        if now.saturating_sub(last) < 250_000_000
            || self
                .last_poll_ns
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_err()
        {
            return;
        }
        self.reload_limits_file(false);
    }

    /// Whether device memory is refused because the limits the node agent
    /// owes this container never arrived (as of the last look at the
    /// limits file; callers poll it first).
    pub fn limits_missing(&self) -> bool {
        if !self.limits_required {
            return false;
        }
        let missing = self.limits_missing.load(Relaxed);
        if missing && !self.limits_missing_warned.swap(true, Relaxed) {
            self.warn_limits_missing();
        }
        missing
    }

    fn warn_limits_missing(&self) {
        hlog!(
            ERROR,
            "no limits file at {}: the node agent mounted this container's limits dir but never wrote its limits (no PreStartContainer or NRI event reached it); device memory is refused until it does",
            self.env.limits_file.display()
        );
    }

    /// The limits file is trusted (it overrides the environment): one the
    /// container itself can write lets it raise its own limits. Logged once
    /// per process; the node agent should mount it read-only.
    fn warn_if_writable(&self, owner: u32) {
        use std::os::unix::ffi::OsStrExt;
        if self.limits_writable_warned.swap(true, Relaxed) {
            return;
        }
        let mut path = self.env.limits_file.as_os_str().as_bytes().to_vec();
        path.push(0);
        // SAFETY: NUL-terminated path; checks with the effective ids.
        let writable = unsafe {
            libc::faccessat(
                libc::AT_FDCWD,
                path.as_ptr().cast(),
                libc::W_OK,
                libc::AT_EACCESS,
            )
        } == 0;
        if writable {
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            hlog!(
                WARN,
                "limits file {} is writable by this process (uid {euid}, file owner {owner}): the container can change its own limits; mount it read-only",
                self.env.limits_file.display()
            );
        }
    }

    fn reload_limits_file(&self, first: bool) {
        use std::os::unix::fs::MetadataExt;
        let Ok(md) = std::fs::metadata(&self.env.limits_file) else {
            if self.limits_required {
                self.limits_missing.store(true, Relaxed);
                if first {
                    self.warn_limits_missing();
                }
            }
            return;
        };
        self.limits_missing.store(false, Relaxed);
        let stamp = (md.mtime() as u64)
            .wrapping_mul(1_000_000_007)
            .wrapping_add(md.mtime_nsec() as u64)
            .wrapping_add(md.ino().wrapping_mul(31))
            ^ md.size();
        if !first && self.limits_stamp.swap(stamp, Relaxed) == stamp {
            return;
        }
        self.limits_stamp.store(stamp, Relaxed);
        self.warn_if_writable(md.uid());
        let mut warnings = Vec::new();
        match hami_shm::limits::read(&self.env.limits_file, &mut warnings) {
            Ok(Some(l)) => {
                if self.region.apply_limits(&l, true) {
                    hlog!(INFO, "limits changed by {}", self.env.limits_file.display());
                }
            }
            Ok(None) => {}
            Err(e) => hlog!(WARN, "{}: {e}", self.env.limits_file.display()),
        }
        for w in warnings {
            hlog!(WARN, "{w}");
        }
    }
}

/// This process's state, rebuilt in a forked child (keyed by pid: the
/// state of another pid is the parent's, never used).
pub(crate) fn process() -> &'static Process {
    let p = PROCESS.load(Acquire);
    // SAFETY: published below and never freed.
    if !p.is_null() && unsafe { (*p).pid } == my_pid() {
        // SAFETY: as above.
        return unsafe { &*p };
    }
    new_process()
}

#[cold]
fn new_process() -> &'static Process {
    let g = global();
    let pid = my_pid();
    let old = PROCESS.load(Acquire);
    // SAFETY: never freed.
    if !old.is_null() && unsafe { (*old).pid } == pid {
        // SAFETY: as above.
        return unsafe { &*old };
    }
    g.region.reclaim_dead(pid, &|p, _| region::pid_exists(p));
    let slot = g
        .region
        .claim_slot(pid, region::process_start_time(pid), g.env.priority())
        .or_else(|| {
            g.region.reclaim_dead(pid, &region::process_alive);
            g.region
                .claim_slot(pid, region::process_start_time(pid), g.env.priority())
        })
        .unwrap_or_else(|| {
            hlog!(
                ERROR,
                "all {} process slots of the shared region are taken",
                region::MAX_SLOTS
            );
            usize::MAX
        });
    let fresh = Box::into_raw(Box::new(Process {
        pid,
        slot,
        tracker: Mutex::new(Tracker::default()),
        pacers: std::array::from_fn(|_| Pacer::default()),
        last_reclaim_ns: AtomicU64::new(0),
        host_pid_tries: std::sync::atomic::AtomicU32::new(crate::hostpid::TRIES),
    }));
    // A forked child's old state stays allocated (it may be mid-use by
    // the thread that forked, in the parent's copy); it is small.
    let mut expected = old;
    loop {
        match PROCESS.compare_exchange(expected, fresh, AcqRel, Acquire) {
            // SAFETY: just published; never freed.
            Ok(_) => return unsafe { &*fresh },
            // SAFETY: published by another thread; never freed.
            Err(current) if unsafe { (*current).pid } == pid => {
                // Another thread of this process won; give our slot back.
                // SAFETY: `fresh` was never shared.
                let mine = unsafe { Box::from_raw(fresh) };
                g.region.release_slot(mine.slot, pid);
                // SAFETY: as above.
                return unsafe { &*current };
            }
            // Still an ancestor's state: replace it.
            Err(current) => expected = current,
        }
    }
}

impl Process {
    pub fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits `bytes` on `dev` for the container, or says why not.
    pub fn admit(&self, g: &Global, dev: usize, bytes: u64) -> Result<(), OverLimit> {
        g.poll_limits_file();
        if g.limits_missing() {
            return Err(OverLimit { used: 0, limit: 0 });
        }
        let limit = g.memory_limit(dev);
        if self.slot == usize::MAX && limit == 0 {
            return Ok(());
        }
        match g.region.reserve(self.slot, dev, bytes, limit) {
            Ok(_) => Ok(()),
            Err(_) => {
                // Maybe a dead process still holds memory, or a racing
                // process was near the limit too: reclaim, then retry once.
                g.region.reclaim_dead(self.pid, &region::process_alive);
                g.region.reserve(self.slot, dev, bytes, limit).map(|_| ()).inspect_err(|e| {
                    hlog!(
                        WARN,
                        "device {dev}: allocation of {bytes} bytes refused: {} of {} bytes in use",
                        e.used,
                        e.limit
                    );
                })
            }
        }
    }

    /// Frees slots of dead processes, at most every 100 ms (view hooks).
    pub fn reclaim_now_and_then(&self, g: &Global) {
        let now = region::monotonic_ns();
        let last = self.last_reclaim_ns.load(Relaxed);
        if now.saturating_sub(last) > 100_000_000 {
            self.last_reclaim_ns.store(now, Relaxed);
            g.region
                .reclaim_dead(self.pid, &|p, _| region::pid_exists(p));
        }
    }
}
