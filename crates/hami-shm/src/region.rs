//! The shared region: one file per container (`CUDA_DEVICE_MEMORY_SHARED_CACHE`),
//! mapped by every CUDA process of the container and read by the node agent.
//!
//! # Layout (version 2, little-endian, all fields naturally aligned)
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 128 | [`Header`] |
//! | 128 | 16 x 192 | [`DeviceEntry`] per container device index (by card UUID) |
//! | 3200 | 1024 x 448 | [`ProcSlot`] per process |
//! | 461 952 | 16 x 6 152 | [`BusyLog`] per device (the pacer's charged kernel intervals) |
//!
//! Total [`REGION_SIZE`] = 560 384 bytes. The header starts with the 8-byte
//! [`MAGIC`] `"HAMIRS\x01\0"`, then the `u32` layout version and the `u32`
//! total size; a reader refuses any other magic, version or size.
//!
//! # Concurrency: no locks, ever
//!
//! Every field is an atomic. A process owns the slot whose `pid` it set with
//! a compare-and-swap from 0, and is the only writer of that slot's usage
//! counters. The usage of a device is the sum of its counters over all slots
//! (up to the high-water mark). Admission of an allocation ([`SharedRegion::reserve`])
//! is one step for the whole container: add the bytes to our own slot first,
//! then sum every slot; if the sum is over the limit, take them back out and
//! refuse. With sequentially consistent operations, of two racing processes
//! at least the later one sees both additions, so the container can never
//! exceed its limit (racing processes near the limit may both refuse; they
//! retry once). A process killed at any instant leaves at worst its own
//! counters, which are reclaimed when another process finds its PID gone
//! ([`SharedRegion::reclaim_dead`]); there is no lock to be left held.
//!
//! Reclaiming is itself crash-safe: the reclaimer swaps the dead PID for its
//! own PID negated, zeroes the slot and then frees it (pid 0). A reclaimer
//! killed half-way leaves a negative PID of a dead process, which the next
//! reclaimer takes over. Zeroing is idempotent.

use crate::MAX_DEVICES;
use crate::env::Limits;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU32, AtomicU64, Ordering::*};

/// `"HAMIRS\x01\0"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"HAMIRS\x01\0");
/// Layout version; bumped on any incompatible change.
pub const VERSION: u32 = 2;
/// Process slots in a region.
pub const MAX_SLOTS: usize = 1024;
/// Bytes of a version-2 region.
pub const REGION_SIZE: usize = std::mem::size_of::<Region>();

/// Header flag: low-priority processes must not launch work (set by the
/// node agent while a high-priority container on the same card is busy).
pub const FLAG_SUSPEND_LOW_PRIORITY: u32 = 1;
/// Header flag: the container is the only one on each of its cards (set by
/// the node agent); under `GPU_CORE_UTILIZATION_POLICY=default` it need not
/// be paced. The agent clears it when another container gets one of them.
pub const FLAG_ALONE: u32 = 2;
/// Device flag: `memory_limit` has been set (0 then means "no limit").
const DEV_MEM_SET: u32 = 1;
/// Device flag: `sm_limit` has been set.
const DEV_SM_SET: u32 = 2;

/// Region header (128 bytes).
#[repr(C)]
pub struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub size: AtomicU32,
    /// One more than the highest slot index ever claimed.
    pub slot_hwm: AtomicU32,
    /// `FLAG_*` bits.
    pub flags: AtomicU32,
    /// Bumped whenever limits are changed, so processes can notice.
    pub limits_generation: AtomicU64,
    /// CLOCK_MONOTONIC ns of the last launch by a priority-0 process.
    pub high_priority_launch_ns: AtomicU64,
    /// CLOCK_MONOTONIC ns when the region was first initialised.
    pub created_ns: AtomicU64,
    /// CLOCK_MONOTONIC ns until which low-priority processes hold their
    /// launches: a lease the node agent renews while a high-priority
    /// container on the same card is busy, so a dead agent pauses nobody
    /// for longer than one lease.
    pub low_priority_hold_until_ns: AtomicU64,
    pub reserved: [AtomicU64; 9],
}

/// Per visible device (192 bytes).
#[repr(C)]
pub struct DeviceEntry {
    /// NUL-padded UUID text (`GPU-...`) of the card at this index of the
    /// container's device list; the interposer counts a process's usage
    /// here when its CUDA device has this UUID (see [`SharedRegion::claim_device`]).
    pub uuid: [AtomicU8; 96],
    /// Bytes; meaningful when the flags say it is set; 0 = no limit.
    pub memory_limit: AtomicU64,
    /// Percent 1..=100; meaningful when set; 0 = 100.
    pub sm_limit: AtomicU32,
    pub flags: AtomicU32,
    /// Highest container-wide usage ever admitted.
    pub peak_used: AtomicU64,
    /// Kernel busy time of processes that are gone.
    pub retired_busy_ns: AtomicU64,
    /// Virtual clock of the compute pacer, CLOCK_MONOTONIC ns.
    pub pacing_clock_ns: AtomicU64,
    /// [`uuid_key`] of the device's UUID, 0 = none: claimed with one
    /// compare-and-swap, so two processes never give one index to two
    /// cards (the text in `uuid` is written after the claim).
    pub uuid_key: AtomicU64,
    /// What the pacer charges per ns it measured, in parts per million
    /// (0: 1,000,000). The node agent lowers it while containers sharing
    /// the card measure more busy time between them than the card had:
    /// each one's measured intervals include waits behind the others.
    pub charge_scale_ppm: AtomicU64,
    pub reserved: [AtomicU64; 5],
}

/// Per process (448 bytes).
#[repr(C)]
pub struct ProcSlot {
    /// 0 free; > 0 the owner's PID; < 0 being reclaimed by the negated PID.
    pub pid: AtomicI32,
    pub priority: AtomicI32,
    /// Start time from `/proc/<pid>/stat` (clock ticks), 0 unknown; guards
    /// against a recycled PID keeping a dead process's usage alive.
    pub start_time: AtomicU64,
    /// PID as the host sees it, when the node agent fills it in; 0 unknown.
    pub host_pid: AtomicI32,
    pub status: AtomicU32,
    /// CLOCK_MONOTONIC ns of the last kernel launch.
    pub last_launch_ns: AtomicU64,
    /// Device memory bytes held per device.
    pub used: [AtomicU64; MAX_DEVICES],
    /// Measured kernel busy time per device.
    pub busy_ns: [AtomicU64; MAX_DEVICES],
    /// Kernel launches per device.
    pub launches: [AtomicU64; MAX_DEVICES],
    pub reserved: [AtomicU64; 4],
}

/// Kernel intervals kept per device for [`SharedRegion::charge_interval`].
pub const BUSY_LOG_LEN: usize = 256;

/// One charged kernel interval (24 bytes).
#[repr(C)]
pub struct BusyEntry {
    /// 0 empty; `u64::MAX` being written; else 1 + the entry's sequence number.
    pub tag: AtomicU64,
    /// CLOCK_MONOTONIC ns.
    pub start: AtomicU64,
    pub end: AtomicU64,
}

/// The container's recently charged kernel intervals on one device (6 152
/// bytes): a ring written by every process of the container.
#[repr(C)]
pub struct BusyLog {
    /// Sequence number of the next entry.
    pub head: AtomicU64,
    pub entries: [BusyEntry; BUSY_LOG_LEN],
}

/// The whole region.
#[repr(C)]
pub struct Region {
    pub header: Header,
    pub devices: [DeviceEntry; MAX_DEVICES],
    pub slots: [ProcSlot; MAX_SLOTS],
    pub busy_log: [BusyLog; MAX_DEVICES],
}

const _: () = {
    assert!(std::mem::size_of::<Header>() == 128);
    assert!(std::mem::offset_of!(Header, low_priority_hold_until_ns) == 48);
    assert!(std::mem::size_of::<DeviceEntry>() == 192);
    assert!(std::mem::offset_of!(DeviceEntry, uuid_key) == 136);
    assert!(std::mem::offset_of!(DeviceEntry, charge_scale_ppm) == 144);
    assert!(std::mem::size_of::<ProcSlot>() == 448);
    assert!(std::mem::offset_of!(Region, devices) == 128);
    assert!(std::mem::offset_of!(Region, slots) == 3200);
    assert!(std::mem::size_of::<BusyLog>() == 6152);
    assert!(std::mem::offset_of!(Region, busy_log) == 3200 + 1024 * 448);
    assert!(REGION_SIZE == 3200 + 1024 * 448 + 16 * 6152);
};

/// Mode of a region file this process creates: the container's group may
/// join (processes of other uids in the container), the world may not.
pub const REGION_FILE_MODE: libc::mode_t = 0o660;

/// How long an opener waits for another process's half-created region file
/// to be initialised before refusing it.
const CREATOR_WAIT_NS: u64 = 1_000_000_000;

/// Why a region could not be used.
#[derive(Debug)]
pub enum RegionError {
    Io(io::Error),
    /// The path is a symbolic link (refused: someone may have planted it to
    /// make us write elsewhere).
    Symlink,
    /// The path is not a regular file.
    NotRegular,
    /// The file exists but its creator never initialised it (it is not
    /// ours to initialise).
    Uninitialised,
    /// The file holds upstream HAMi-core's layout (see [`crate::upstream`]).
    Upstream,
    /// Another magic, version or size.
    Incompatible {
        magic: u64,
        version: u32,
        size: u64,
    },
}

impl std::fmt::Display for RegionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegionError::Io(e) => write!(f, "shared region: {e}"),
            RegionError::Symlink => write!(
                f,
                "shared region: the path is a symbolic link; refused (remove it, or point CUDA_DEVICE_MEMORY_SHARED_CACHE at the real file)"
            ),
            RegionError::NotRegular => write!(f, "shared region: not a regular file; refused"),
            RegionError::Uninitialised => write!(
                f,
                "shared region: the file exists but was never initialised by its creator; refused (not ours to initialise)"
            ),
            RegionError::Upstream => {
                write!(
                    f,
                    "shared region holds upstream HAMi-core's layout (magic 19920718)"
                )
            }
            RegionError::Incompatible {
                magic,
                version,
                size,
            } => write!(
                f,
                "shared region: magic {magic:#x}, version {version}, size {size}: expected magic {MAGIC:#x}, version {VERSION}, size {REGION_SIZE}"
            ),
        }
    }
}

impl std::error::Error for RegionError {}

impl From<io::Error> for RegionError {
    fn from(e: io::Error) -> Self {
        RegionError::Io(e)
    }
}

/// The allocation would take the device over its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    /// Container usage on the device without this allocation.
    pub used: u64,
    pub limit: u64,
}

/// One process as seen in a region snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    pub slot: usize,
    pub pid: i32,
    /// The pid as the host (and NVML) sees it; 0 unknown.
    pub host_pid: i32,
    pub priority: i32,
    pub used: [u64; MAX_DEVICES],
    pub busy_ns: [u64; MAX_DEVICES],
}

/// A mapped region. Cheap to share between threads; unmapped on drop.
pub struct SharedRegion {
    ptr: *mut Region,
}

// SAFETY: every field of `Region` is an atomic; the mapping lives as long as
// `SharedRegion`.
unsafe impl Send for SharedRegion {}
// SAFETY: as above.
unsafe impl Sync for SharedRegion {}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from a successful mmap of REGION_SIZE bytes.
        unsafe { libc::munmap(self.ptr.cast(), REGION_SIZE) };
    }
}

impl std::ops::Deref for SharedRegion {
    type Target = Region;
    fn deref(&self) -> &Region {
        // SAFETY: valid mapping of the right size, all-atomic contents.
        unsafe { &*self.ptr }
    }
}

impl SharedRegion {
    /// Opens the region file at `path`, creating and initialising it if it
    /// does not exist. Safe to call from hundreds of processes at once: one
    /// creates the file (`O_EXCL`), mode 0660 (never world-writable), and
    /// initialises it; the others wait briefly for it to be initialised.
    ///
    /// A file this call did not create is never initialised, truncated or
    /// chmodded: a symlink at `path` is refused ([`RegionError::Symlink`]),
    /// so is anything but a regular file, a file with another header, and a
    /// file that stays uninitialised ([`RegionError::Uninitialised`]).
    pub fn open(path: &Path) -> Result<SharedRegion, RegionError> {
        Self::open_with(path, true)
    }

    /// Opens an existing, initialised region without creating one (the node
    /// monitor, which must not create files in a container's directory).
    /// Same refusals as [`SharedRegion::open`].
    pub fn open_existing(path: &Path) -> Result<SharedRegion, RegionError> {
        Self::open_with(path, false)
    }

    fn open_with(path: &Path, create: bool) -> Result<SharedRegion, RegionError> {
        use std::os::unix::ffi::OsStrExt;
        let mut cpath = path.as_os_str().as_bytes().to_vec();
        cpath.push(0);
        let open = |flags: libc::c_int| {
            // SAFETY: NUL-terminated path; a plain syscall.
            let fd = unsafe {
                libc::open(
                    cpath.as_ptr().cast(),
                    flags | libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    REGION_FILE_MODE as libc::c_uint,
                )
            };
            if fd >= 0 {
                return Ok(fd);
            }
            let e = io::Error::last_os_error();
            Err(match e.raw_os_error() {
                Some(libc::ELOOP) => RegionError::Symlink,
                _ => RegionError::Io(e),
            })
        };
        let (fd, created) = if create {
            match open(libc::O_CREAT | libc::O_EXCL) {
                Ok(fd) => (fd, true),
                Err(RegionError::Io(e)) if e.kind() == io::ErrorKind::AlreadyExists => {
                    (open(0)?, false)
                }
                Err(e) => return Err(e),
            }
        } else {
            (open(0)?, false)
        };
        let result = Self::map_fd(fd, created);
        // SAFETY: fd is ours; the mapping keeps the file alive.
        unsafe { libc::close(fd) };
        result
    }

    fn map_fd(fd: libc::c_int, created: bool) -> Result<SharedRegion, RegionError> {
        let stat = || {
            // SAFETY: fstat into a zeroed struct.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: valid fd and pointer.
            if unsafe { libc::fstat(fd, &mut st) } != 0 {
                return Err(RegionError::Io(io::Error::last_os_error()));
            }
            Ok(st)
        };
        let st = stat()?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(RegionError::NotRegular);
        }
        if created {
            // Ours: group members of the container may join, the world may
            // not (the umask may have taken the group bits away).
            // SAFETY: plain syscalls on our own fd.
            unsafe { libc::fchmod(fd, REGION_FILE_MODE) };
            // SAFETY: as above.
            if unsafe { libc::ftruncate(fd, REGION_SIZE as libc::off_t) } != 0 {
                return Err(io::Error::last_os_error().into());
            }
        } else {
            // Someone else's: a creator racing us may not have sized it yet.
            let mut size = st.st_size as u64;
            let deadline = monotonic_ns() + CREATOR_WAIT_NS;
            while size == 0 && monotonic_ns() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
                size = stat()?.st_size as u64;
            }
            if size == 0 {
                return Err(RegionError::Uninitialised);
            }
            if size != REGION_SIZE as u64 {
                let mut head = [0u8; 8];
                // SAFETY: reading 8 bytes into a stack buffer.
                let n = unsafe { libc::pread(fd, head.as_mut_ptr().cast(), 8, 0) };
                let word = i32::from_le_bytes([head[0], head[1], head[2], head[3]]);
                if n == 8 && word == crate::upstream::MAGIC {
                    return Err(RegionError::Upstream);
                }
                return Err(RegionError::Incompatible {
                    magic: u64::from_le_bytes(head),
                    version: 0,
                    size,
                });
            }
        }
        // SAFETY: mapping a file of at least REGION_SIZE bytes.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REGION_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        let region = SharedRegion { ptr: ptr.cast() };
        if created {
            region.initialise()?;
        } else {
            region.await_initialised()?;
        }
        Ok(region)
    }

    /// Waits (briefly) for the creator of the file to publish the magic;
    /// never writes.
    fn await_initialised(&self) -> Result<(), RegionError> {
        let deadline = monotonic_ns() + CREATOR_WAIT_NS;
        while self.header.magic.load(Acquire) == 0 {
            if monotonic_ns() >= deadline {
                return Err(RegionError::Uninitialised);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.check_header()
    }

    /// A region in anonymous shared memory: private to this process and the
    /// children it forks. Used when no file can be opened, and by tests.
    pub fn anonymous() -> Result<SharedRegion, RegionError> {
        // SAFETY: anonymous shared mapping, zero-filled by the kernel.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REGION_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        let region = SharedRegion { ptr: ptr.cast() };
        region.initialise()?;
        Ok(region)
    }

    /// Initialises a region this process created (a fresh file or
    /// anonymous memory): writes the constants, publishes the magic last.
    fn initialise(&self) -> Result<(), RegionError> {
        let h = &self.header;
        if h.magic.load(Acquire) == 0 {
            h.version.store(VERSION, Relaxed);
            h.size.store(REGION_SIZE as u32, Relaxed);
            let _ = h
                .created_ns
                .compare_exchange(0, monotonic_ns(), Relaxed, Relaxed);
            let _ = h.magic.compare_exchange(0, MAGIC, Release, Relaxed);
        }
        self.check_header()
    }

    fn check_header(&self) -> Result<(), RegionError> {
        let h = &self.header;
        let (magic, version, size) = (
            h.magic.load(Acquire),
            h.version.load(Relaxed),
            h.size.load(Relaxed),
        );
        if magic != MAGIC || version != VERSION || size as usize != REGION_SIZE {
            return Err(RegionError::Incompatible {
                magic,
                version,
                size: size as u64,
            });
        }
        Ok(())
    }

    fn hwm(&self) -> usize {
        (self.header.slot_hwm.load(SeqCst) as usize).min(MAX_SLOTS)
    }

    /// Claims a free slot for `pid`; `None` when all 1024 are taken.
    pub fn claim_slot(&self, pid: i32, start_time: u64, priority: i32) -> Option<usize> {
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.pid.load(Relaxed) != 0 {
                continue;
            }
            if slot.pid.compare_exchange(0, pid, SeqCst, Relaxed).is_ok() {
                slot.start_time.store(start_time, Relaxed);
                slot.priority.store(priority, Relaxed);
                slot.status.store(0, Relaxed);
                self.header.slot_hwm.fetch_max(i as u32 + 1, SeqCst);
                return Some(i);
            }
        }
        None
    }

    /// Frees every slot held by `pid`. A process calls this once per program
    /// image, before claiming its slot: a slot already holding its pid was
    /// claimed by the image it `exec`ed away from, whose memory is gone.
    pub fn release_stale(&self, pid: i32) -> usize {
        let mut n = 0;
        for i in 0..self.hwm() {
            if self.slots[i].pid.load(SeqCst) == pid {
                self.release_slot(i, pid);
                n += 1;
            }
        }
        n
    }

    /// Gives a slot back (normal exit). Its usage is dropped, its busy time kept.
    pub fn release_slot(&self, slot: usize, pid: i32) {
        let Some(s) = self.slots.get(slot) else {
            return;
        };
        if s.pid.compare_exchange(pid, -pid, SeqCst, Relaxed).is_ok() {
            self.scrub(slot, -pid);
        }
    }

    /// Admits `bytes` on `dev` for the process in `slot` if the container
    /// stays within `limit` (0 = no limit). Returns the container's usage
    /// including this allocation. One step: see the module docs.
    pub fn reserve(
        &self,
        slot: usize,
        dev: usize,
        bytes: u64,
        limit: u64,
    ) -> Result<u64, OverLimit> {
        let (Some(s), true) = (self.slots.get(slot), dev < MAX_DEVICES) else {
            return Err(OverLimit { used: 0, limit });
        };
        s.used[dev].fetch_add(bytes, SeqCst);
        let total = self.device_used(dev);
        if limit != 0 && total > limit {
            s.used[dev].fetch_sub(bytes, SeqCst);
            return Err(OverLimit {
                used: total.saturating_sub(bytes),
                limit,
            });
        }
        self.devices[dev].peak_used.fetch_max(total, Relaxed);
        Ok(total)
    }

    /// Adds usage that has already happened (e.g. an IPC handle opened from
    /// another process, or a driver rounding up), without a limit check.
    pub fn add_used(&self, slot: usize, dev: usize, bytes: u64) {
        if let (Some(s), true) = (self.slots.get(slot), dev < MAX_DEVICES) {
            s.used[dev].fetch_add(bytes, SeqCst);
            let total = self.device_used(dev);
            self.devices[dev].peak_used.fetch_max(total, Relaxed);
        }
    }

    /// Takes back `bytes` on `dev`; never goes below zero.
    pub fn release(&self, slot: usize, dev: usize, bytes: u64) {
        if let (Some(s), true) = (self.slots.get(slot), dev < MAX_DEVICES) {
            let _ = s.used[dev].fetch_update(SeqCst, SeqCst, |v| Some(v.saturating_sub(bytes)));
        }
    }

    /// Container-wide bytes in use on `dev`.
    pub fn device_used(&self, dev: usize) -> u64 {
        if dev >= MAX_DEVICES {
            return 0;
        }
        self.slots[..self.hwm()]
            .iter()
            .fold(0u64, |acc, s| acc.saturating_add(s.used[dev].load(SeqCst)))
    }

    /// Bytes on `dev` held by one slot.
    pub fn slot_used(&self, slot: usize, dev: usize) -> u64 {
        match (self.slots.get(slot), dev < MAX_DEVICES) {
            (Some(s), true) => s.used[dev].load(SeqCst),
            _ => 0,
        }
    }

    /// Frees the slots of processes that `alive` says are gone; `me` is the
    /// caller's PID. Returns how many slots were reclaimed.
    pub fn reclaim_dead(&self, me: i32, alive: &dyn Fn(i32, u64) -> bool) -> usize {
        let mut n = 0;
        for i in 0..self.hwm() {
            let s = &self.slots[i];
            let pid = s.pid.load(SeqCst);
            let dead = match pid {
                0 => false,
                p if p == me || p == -me => false,
                p if p > 0 => !alive(p, s.start_time.load(Relaxed)),
                // A reclaimer that died half-way; finish its work.
                p => !alive(-p, 0),
            };
            if dead && s.pid.compare_exchange(pid, -me, SeqCst, Relaxed).is_ok() {
                self.scrub(i, -me);
                n += 1;
            }
        }
        n
    }

    /// Zeroes a slot we hold as `marker` (a negative PID), then frees it.
    fn scrub(&self, slot: usize, marker: i32) {
        let s = &self.slots[slot];
        for d in 0..MAX_DEVICES {
            s.used[d].store(0, SeqCst);
            let busy = s.busy_ns[d].swap(0, SeqCst);
            if busy != 0 {
                self.devices[d].retired_busy_ns.fetch_add(busy, Relaxed);
            }
            s.launches[d].store(0, Relaxed);
        }
        s.start_time.store(0, Relaxed);
        s.host_pid.store(0, Relaxed);
        s.last_launch_ns.store(0, Relaxed);
        let _ = s.pid.compare_exchange(marker, 0, SeqCst, Relaxed);
    }

    /// Adds measured kernel time of the process in `slot` on `dev`.
    pub fn add_busy(&self, slot: usize, dev: usize, ns: u64) {
        if let (Some(s), true) = (self.slots.get(slot), dev < MAX_DEVICES) {
            s.busy_ns[dev].fetch_add(ns, Relaxed);
        }
    }

    /// Records the kernel interval `[start, end)` (CLOCK_MONOTONIC ns) of a
    /// process of the container on `dev` and returns the part of it that no
    /// interval recorded before it covers: the device time to charge.
    ///
    /// Whatever order the container's processes record their intervals in,
    /// the charges add up to the length of the *union* of the intervals, so
    /// a kernel's wait behind another kernel of the same container (which
    /// its events also time) is charged once, not twice. The interval is
    /// published first and then compared with the entries published before
    /// it (by sequence number), so of two racing processes the later one
    /// sees the earlier one's interval, or (if still being written) both
    /// charge the overlap: errors only ever over-charge. Intervals older than
    /// the last [`BUSY_LOG_LEN`] recorded are forgotten (over-charging too,
    /// if one of them still overlapped). No lock, so nothing is left held by
    /// a process killed half-way.
    pub fn charge_interval(&self, dev: usize, start: u64, end: u64) -> u64 {
        if end <= start {
            return 0;
        }
        let Some(log) = self.busy_log.get(dev) else {
            return end - start;
        };
        let n = log.head.fetch_add(1, SeqCst);
        let mine = &log.entries[n as usize % BUSY_LOG_LEN];
        mine.tag.store(u64::MAX, SeqCst);
        mine.start.store(start, SeqCst);
        mine.end.store(end, SeqCst);
        mine.tag.store(n + 1, SeqCst);
        // Earlier intervals, clipped to ours.
        let mut cover = [(0u64, 0u64); BUSY_LOG_LEN];
        let mut k = 0;
        for e in &log.entries {
            let tag = e.tag.load(SeqCst);
            if tag == 0 || tag == u64::MAX || tag > n {
                continue;
            }
            let (s, t) = (e.start.load(SeqCst), e.end.load(SeqCst));
            if e.tag.load(SeqCst) != tag {
                continue;
            }
            let (s, t) = (s.max(start), t.min(end));
            if s < t {
                cover[k] = (s, t);
                k += 1;
            }
        }
        let cover = &mut cover[..k];
        cover.sort_unstable();
        let (mut covered, mut reach) = (0, start);
        for &(s, t) in cover.iter() {
            if t > reach {
                covered += t - s.max(reach);
                reach = t;
            }
        }
        (end - start) - covered
    }

    /// Total kernel busy time of the container on `dev`, past processes included.
    pub fn device_busy_ns(&self, dev: usize) -> u64 {
        if dev >= MAX_DEVICES {
            return 0;
        }
        let live: u64 = self.slots[..self.hwm()]
            .iter()
            .map(|s| s.busy_ns[dev].load(Relaxed))
            .sum();
        live + self.devices[dev].retired_busy_ns.load(Relaxed)
    }

    /// Parts per million of measured device time the pacer charges on
    /// `dev` (see [`DeviceEntry::charge_scale_ppm`]).
    pub fn charge_scale_ppm(&self, dev: usize) -> u64 {
        match self
            .devices
            .get(dev)
            .map(|d| d.charge_scale_ppm.load(Relaxed))
        {
            None | Some(0) => 1_000_000,
            Some(p) => p.min(1_000_000),
        }
    }

    /// Memory limit of `dev` in bytes (0 = none), `None` if never set.
    pub fn memory_limit(&self, dev: usize) -> Option<u64> {
        let d = self.devices.get(dev)?;
        (d.flags.load(Acquire) & DEV_MEM_SET != 0).then(|| d.memory_limit.load(Relaxed))
    }

    /// Compute share of `dev` in percent, `None` if never set.
    pub fn sm_limit(&self, dev: usize) -> Option<u32> {
        let d = self.devices.get(dev)?;
        (d.flags.load(Acquire) & DEV_SM_SET != 0).then(|| match d.sm_limit.load(Relaxed) {
            0 => 100,
            p => p.min(100),
        })
    }

    /// Sets limits that are given in `limits`; with `overwrite` false only
    /// those the region does not have yet (a process seeding from its env),
    /// with `overwrite` true all of them (the node agent, the limits file).
    pub fn apply_limits(&self, limits: &Limits, overwrite: bool) -> bool {
        let mut changed = false;
        for (i, d) in self.devices.iter().enumerate() {
            let flags = d.flags.load(Acquire);
            if let Some(m) = limits.memory[i]
                && (overwrite || flags & DEV_MEM_SET == 0)
                && (flags & DEV_MEM_SET == 0 || d.memory_limit.load(Relaxed) != m)
            {
                d.memory_limit.store(m, Relaxed);
                d.flags.fetch_or(DEV_MEM_SET, Release);
                changed = true;
            }
            if let Some(s) = limits.sm[i]
                && (overwrite || flags & DEV_SM_SET == 0)
                && (flags & DEV_SM_SET == 0 || d.sm_limit.load(Relaxed) != s)
            {
                d.sm_limit.store(s, Relaxed);
                d.flags.fetch_or(DEV_SM_SET, Release);
                changed = true;
            }
        }
        if changed {
            self.header.limits_generation.fetch_add(1, Release);
        }
        changed
    }

    /// Sets one device's memory limit (node agent, live resize).
    pub fn set_memory_limit(&self, dev: usize, bytes: u64) {
        let mut l = Limits::default();
        if dev < MAX_DEVICES {
            l.memory[dev] = Some(bytes);
            self.apply_limits(&l, true);
        }
    }

    /// Sets one device's compute share (node agent, live resize).
    pub fn set_sm_limit(&self, dev: usize, percent: u32) {
        let mut l = Limits::default();
        if dev < MAX_DEVICES {
            l.sm[dev] = Some(percent.min(100));
            self.apply_limits(&l, true);
        }
    }

    /// Records a device UUID (truncated to 95 bytes) at index `dev` of the
    /// container's device list (the node agent, which knows the list).
    pub fn set_uuid(&self, dev: usize, uuid: &str) {
        if let Some(d) = self.devices.get(dev) {
            d.uuid_key.store(uuid_key(uuid), SeqCst);
            Self::write_uuid_text(d, uuid);
        }
    }

    fn write_uuid_text(d: &DeviceEntry, uuid: &str) {
        let b = uuid.as_bytes();
        for (i, cell) in d.uuid.iter().enumerate() {
            cell.store(
                if i < 95 {
                    b.get(i).copied().unwrap_or(0)
                } else {
                    0
                },
                Relaxed,
            );
        }
    }

    /// The index of the container's device list that holds `uuid`.
    pub fn find_device(&self, uuid: &str) -> Option<usize> {
        let k = uuid_key(uuid);
        self.devices.iter().position(|d| {
            let key = d.uuid_key.load(SeqCst);
            key == k || (key == 0 && d.uuid[0].load(Relaxed) != 0 && uuid_key(&text_of(d)) == k)
        })
    }

    /// The index for `uuid`: where it already is, else the first free index
    /// (`preferred` first), claimed with one compare-and-swap so racing
    /// processes never put two cards at one index. `None` when all
    /// [`MAX_DEVICES`] indices hold other cards.
    pub fn claim_device(&self, uuid: &str, preferred: Option<usize>) -> Option<usize> {
        if let Some(i) = self.find_device(uuid) {
            return Some(i);
        }
        let k = uuid_key(uuid);
        let order = preferred
            .filter(|&p| p < MAX_DEVICES)
            .into_iter()
            .chain(0..MAX_DEVICES);
        for i in order {
            let d = &self.devices[i];
            if d.uuid[0].load(Relaxed) != 0 && d.uuid_key.load(SeqCst) == 0 {
                // Text written by an older writer without a key: taken.
                continue;
            }
            match d.uuid_key.compare_exchange(0, k, SeqCst, SeqCst) {
                Ok(_) => {
                    Self::write_uuid_text(d, uuid);
                    return Some(i);
                }
                Err(other) if other == k => return Some(i),
                Err(_) => {}
            }
        }
        None
    }

    /// The UUID recorded for `dev`, empty if none.
    pub fn uuid(&self, dev: usize) -> String {
        self.devices.get(dev).map(text_of).unwrap_or_default()
    }

    /// Whether low-priority processes are told to hold their launches at
    /// CLOCK_MONOTONIC `now_ns`: the suspend flag, or the node agent's hold
    /// lease running.
    pub fn low_priority_held(&self, now_ns: u64) -> bool {
        self.held_at(|| now_ns)
    }

    /// [`SharedRegion::low_priority_held`] now; reads the clock only while
    /// a lease is out (this runs before every launch).
    pub fn low_priority_held_now(&self) -> bool {
        self.held_at(monotonic_ns)
    }

    fn held_at(&self, now_ns: impl FnOnce() -> u64) -> bool {
        if self.header.flags.load(Acquire) & FLAG_SUSPEND_LOW_PRIORITY != 0 {
            return true;
        }
        let until = self.header.low_priority_hold_until_ns.load(Acquire);
        until != 0 && until > now_ns()
    }

    /// Whether the node agent says the container is alone on its cards.
    pub fn alone(&self) -> bool {
        self.header.flags.load(Acquire) & FLAG_ALONE != 0
    }

    /// Node agent: suspend or resume the container's low-priority launches.
    pub fn set_low_priority_suspended(&self, on: bool) {
        if on {
            self.header
                .flags
                .fetch_or(FLAG_SUSPEND_LOW_PRIORITY, Release);
        } else {
            self.header
                .flags
                .fetch_and(!FLAG_SUSPEND_LOW_PRIORITY, Release);
        }
    }

    /// Whether a priority-0 process of this container launched work in the
    /// last `window_ns`. The node agent holds the low-priority containers
    /// sharing a card (renewing their `low_priority_hold_until_ns` lease)
    /// while any container on it answers yes.
    pub fn high_priority_active(&self, window_ns: u64) -> bool {
        let last = self.header.high_priority_launch_ns.load(Relaxed);
        last != 0 && monotonic_ns().saturating_sub(last) <= window_ns
    }

    /// Every occupied slot.
    pub fn processes(&self) -> Vec<ProcInfo> {
        self.slots[..self.hwm()]
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let pid = s.pid.load(SeqCst);
                (pid > 0).then(|| ProcInfo {
                    slot: i,
                    pid,
                    host_pid: s.host_pid.load(Relaxed),
                    priority: s.priority.load(Relaxed),
                    used: std::array::from_fn(|d| s.used[d].load(SeqCst)),
                    busy_ns: std::array::from_fn(|d| s.busy_ns[d].load(Relaxed)),
                })
            })
            .collect()
    }
}

fn text_of(d: &DeviceEntry) -> String {
    let bytes: Vec<u8> = d
        .uuid
        .iter()
        .map(|c| c.load(Relaxed))
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The key a device UUID is matched by: FNV-1a of its hex digits, lower
/// case, after any `GPU-`/`MIG-` prefix (so `GPU-ABCD...` from one tool and
/// `GPU-abcd...` from another match), padded with zeros to the 32 digits of
/// 16 bytes; of the whole text when it has no hex digits. Never 0.
pub fn uuid_key(uuid: &str) -> u64 {
    let t = uuid.trim();
    let body = t
        .strip_prefix("GPU-")
        .or_else(|| t.strip_prefix("MIG-"))
        .unwrap_or(t);
    let mut hex: Vec<u8> = body
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .map(|b| b.to_ascii_lowercase())
        .collect();
    if !hex.is_empty() && hex.len() < 32 {
        // A short form names the 16 bytes it spells, the rest zero.
        hex.resize(32, b'0');
    }
    let bytes = if hex.is_empty() {
        t.as_bytes()
    } else {
        &hex[..]
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h.max(1)
}

/// CLOCK_MONOTONIC in nanoseconds (shared by all processes of a host).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the same clock at the kernel
/// tick's resolution (a few ms), cheaper to read; for times only looked at
/// in seconds.
pub fn coarse_monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; both monotonic clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `(state, starttime)` from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(u8, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: skip past the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.bytes().next()?;
    // starttime is field 22 overall, i.e. the 20th after the state.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Start time of `pid` (clock ticks since boot), for [`SharedRegion::claim_slot`].
pub fn process_start_time(pid: i32) -> u64 {
    proc_stat(pid).map_or(0, |(_, t)| t)
}

/// Whether a process with this PID exists (one `kill(pid, 0)`; a zombie
/// or a recycled PID still counts). Cheap enough for hundreds of slots.
pub fn pid_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether `pid` is a live process that is the one that claimed a slot with
/// `start_time` (0 = do not compare). Zombies count as gone.
pub fn process_alive(pid: i32, start_time: u64) -> bool {
    if !pid_exists(pid) {
        return false;
    }
    match proc_stat(pid) {
        Some((b'Z' | b'X', _)) => false,
        Some((_, t)) => start_time == 0 || t == start_time,
        // No procfs (or another pid namespace): trust kill().
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    /// Length of the union of intervals, by brute force over a sorted merge.
    fn union_len(iv: &[(u64, u64)]) -> u64 {
        let mut v: Vec<_> = iv.iter().copied().filter(|(a, b)| a < b).collect();
        v.sort_unstable();
        let (mut total, mut reach) = (0, 0);
        for (a, b) in v {
            if b > reach {
                total += b - a.max(reach);
                reach = b;
            }
        }
        total
    }

    #[test]
    fn charged_intervals_add_up_to_their_union() {
        let r = SharedRegion::anonymous().unwrap();
        // A kernel that waited behind another of the container is charged
        // only for its own part, in whichever order they are recorded.
        assert_eq!(r.charge_interval(0, 100, 300), 200);
        assert_eq!(r.charge_interval(0, 100, 200), 0);
        assert_eq!(r.charge_interval(0, 50, 350), 100);
        assert_eq!(r.charge_interval(0, 400, 500), 100);
        // Another device has its own log.
        assert_eq!(r.charge_interval(1, 100, 300), 200);
        assert_eq!(r.charge_interval(0, 10, 10), 0);
    }

    #[test]
    fn intervals_beyond_the_log_are_over_charged_never_under() {
        let r = SharedRegion::anonymous().unwrap();
        assert_eq!(r.charge_interval(0, 0, 1000), 1000);
        for i in 0..BUSY_LOG_LEN as u64 {
            r.charge_interval(0, 10_000 + 10 * i, 10_000 + 10 * i + 5);
        }
        // The first interval has been forgotten: its overlap is charged again.
        assert_eq!(r.charge_interval(0, 500, 700), 200);
    }

    #[test]
    fn racing_recorders_never_under_charge() {
        let r = Arc::new(SharedRegion::anonymous().unwrap());
        let intervals: Vec<(u64, u64)> = (0..4000u64)
            .map(|i| (i * 700 % 9973 * 10, i * 700 % 9973 * 10 + 1 + i % 97 * 13))
            .collect();
        let charged: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = intervals
                .chunks(1000)
                .map(|c| {
                    let r = &r;
                    s.spawn(move || {
                        c.iter()
                            .map(|&(a, b)| r.charge_interval(3, a, b))
                            .sum::<u64>()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert!(charged >= union_len(&intervals));
        assert!(charged <= intervals.iter().map(|(a, b)| b - a).sum());
    }

    #[test]
    fn reserve_respects_the_limit() {
        let r = SharedRegion::anonymous().unwrap();
        let a = r.claim_slot(10, 0, 1).unwrap();
        let b = r.claim_slot(11, 0, 1).unwrap();
        assert_ne!(a, b);
        assert_eq!(r.reserve(a, 0, 600, 1000), Ok(600));
        assert_eq!(
            r.reserve(b, 0, 500, 1000),
            Err(OverLimit {
                used: 600,
                limit: 1000
            })
        );
        assert_eq!(r.reserve(b, 0, 400, 1000), Ok(1000));
        assert_eq!(
            r.reserve(b, 1, 5000, 0),
            Ok(5000),
            "0 = no limit; devices are separate"
        );
        r.release(a, 0, 600);
        assert_eq!(r.device_used(0), 400);
        r.release(a, 0, 600);
        assert_eq!(r.slot_used(a, 0), 0, "saturates at zero");
        assert_eq!(r.devices[0].peak_used.load(Relaxed), 1000);
    }

    #[test]
    fn reclaim_frees_dead_processes_only() {
        let r = SharedRegion::anonymous().unwrap();
        let dead = r.claim_slot(100, 0, 1).unwrap();
        let live = r.claim_slot(200, 0, 1).unwrap();
        r.reserve(dead, 0, 700, 1000).unwrap();
        r.add_busy(dead, 0, 5);
        r.reserve(live, 0, 200, 1000).unwrap();
        let alive = |p: i32, _| p != 100;
        assert_eq!(r.reclaim_dead(1, &alive), 1);
        assert_eq!(r.device_used(0), 200);
        assert_eq!(r.device_busy_ns(0), 5, "busy time of the dead is kept");
        assert_eq!(r.processes().len(), 1);
        // A reclaimer that died half-way (negative pid of a dead process).
        r.slots[dead].pid.store(-300, SeqCst);
        r.slots[dead].used[0].store(50, SeqCst);
        assert_eq!(r.reclaim_dead(1, &|p, _| p != 300), 1);
        assert_eq!(r.slots[dead].pid.load(SeqCst), 0);
        assert_eq!(r.device_used(0), 200);
    }

    #[test]
    fn released_slots_are_reused_and_keep_busy_time() {
        let r = SharedRegion::anonymous().unwrap();
        let a = r.claim_slot(7, 0, 1).unwrap();
        r.reserve(a, 2, 100, 0).unwrap();
        r.add_busy(a, 2, 40);
        r.release_slot(a, 8);
        assert_eq!(r.processes().len(), 1, "only the owner releases its slot");
        r.release_slot(a, 7);
        assert!(r.processes().is_empty());
        assert_eq!(r.device_used(2), 0);
        assert_eq!(r.device_busy_ns(2), 40);
        assert_eq!(r.claim_slot(9, 0, 0), Some(a), "the freed slot is reused");
        r.reserve(a, 0, 5, 0).unwrap();
        assert_eq!(r.release_stale(9), 1);
        assert_eq!(r.device_used(0), 0);
    }

    #[test]
    fn high_priority_activity_and_suspension() {
        let r = SharedRegion::anonymous().unwrap();
        assert!(!r.high_priority_active(1_000_000_000));
        r.header
            .high_priority_launch_ns
            .store(monotonic_ns(), SeqCst);
        assert!(r.high_priority_active(1_000_000_000));
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(!r.high_priority_active(1_000_000));
        let now = monotonic_ns();
        r.set_low_priority_suspended(true);
        assert!(r.low_priority_held(now));
        r.set_low_priority_suspended(false);
        assert!(!r.low_priority_held(now));
        // The agent's lease holds until it runs out.
        r.header
            .low_priority_hold_until_ns
            .store(now + 1_000, SeqCst);
        assert!(r.low_priority_held(now));
        assert!(!r.low_priority_held(now + 1_000));
    }

    #[test]
    fn limits_seed_and_overwrite() {
        let r = SharedRegion::anonymous().unwrap();
        let mut env = Limits::default();
        env.memory[0] = Some(1 << 30);
        env.sm[0] = Some(30);
        assert!(r.apply_limits(&env, false));
        let mut other = Limits::default();
        other.memory[0] = Some(5 << 30);
        assert!(!r.apply_limits(&other, false), "a seed never overrides");
        assert_eq!(r.memory_limit(0), Some(1 << 30));
        let g = r.header.limits_generation.load(SeqCst);
        assert!(r.apply_limits(&other, true));
        assert_eq!(r.memory_limit(0), Some(5 << 30));
        assert!(r.header.limits_generation.load(SeqCst) > g);
        assert_eq!(r.sm_limit(0), Some(30));
        assert_eq!(r.sm_limit(1), None);
        r.set_uuid(0, "GPU-1234");
        assert_eq!(r.uuid(0), "GPU-1234");
    }

    #[test]
    fn file_region_is_shared_and_checked() {
        let dir = std::env::temp_dir().join(format!("hami-shm-region-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.cache");
        assert!(matches!(
            SharedRegion::open_existing(&path),
            Err(RegionError::Io(e)) if e.kind() == io::ErrorKind::NotFound
        ));
        let a = SharedRegion::open(&path).unwrap();
        let b = SharedRegion::open_existing(&path).unwrap();
        let s = a.claim_slot(42, 0, 1).unwrap();
        a.reserve(s, 3, 123, 0).unwrap();
        assert_eq!(b.device_used(3), 123);
        let bad = dir.join("bad.cache");
        std::fs::write(&bad, [0u8; 100]).unwrap();
        assert!(matches!(
            SharedRegion::open(&bad),
            Err(RegionError::Incompatible { .. })
        ));
        let mut up = vec![0u8; 100];
        up[..4].copy_from_slice(&crate::upstream::MAGIC.to_le_bytes());
        std::fs::write(&bad, up).unwrap();
        assert!(matches!(
            SharedRegion::open(&bad),
            Err(RegionError::Upstream)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hami-shm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_symlink_at_the_region_path_is_refused() {
        let dir = scratch("symlink");
        let target = dir.join("elsewhere");
        std::fs::write(&target, b"precious").unwrap();
        let link = dir.join("r.cache");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for r in [
            SharedRegion::open(&link),
            SharedRegion::open_existing(&link),
        ] {
            let e = r.err().expect("a symlink must be refused");
            assert!(matches!(e, RegionError::Symlink), "{e}");
            assert!(e.to_string().contains("symbolic link"), "{e}");
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        // A dangling link too (it would otherwise create the target).
        let dangling = dir.join("d.cache");
        std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
        assert!(matches!(
            SharedRegion::open(&dangling),
            Err(RegionError::Symlink)
        ));
        assert!(!dir.join("nowhere").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_created_region_is_not_world_writable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("mode");
        let path = dir.join("r.cache");
        let _r = SharedRegion::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o007, 0, "mode {mode:o} lets the world in");
        assert_eq!(mode, REGION_FILE_MODE, "mode {mode:o}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_foreign_uninitialised_file_is_refused_not_initialised() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("foreign");
        // The right size but no header, and an empty file: neither is ours
        // to initialise, truncate or chmod.
        for (name, content) in [
            ("sized.cache", vec![0u8; REGION_SIZE]),
            ("empty.cache", vec![]),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, &content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).unwrap();
            for r in [
                SharedRegion::open(&path),
                SharedRegion::open_existing(&path),
            ] {
                let e = r
                    .err()
                    .expect("an uninitialised foreign file must be refused");
                assert!(matches!(e, RegionError::Uninitialised), "{name}: {e}");
            }
            assert!(
                std::fs::read(&path).unwrap() == content,
                "{name} was written"
            );
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o604, "{name} was chmodded");
        }
        // A bad header is refused as incompatible, and left alone.
        let path = dir.join("bad.cache");
        let mut bad = vec![0u8; REGION_SIZE];
        bad[..8].copy_from_slice(b"NOTOURS!");
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            SharedRegion::open(&path),
            Err(RegionError::Incompatible { .. })
        ));
        assert!(std::fs::read(&path).unwrap() == bad);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn devices_are_claimed_by_uuid_once() {
        let r = SharedRegion::anonymous().unwrap();
        let a = "GPU-aaaaaaaa-0000-0000-0000-000000000000";
        let b = "GPU-bbbbbbbb-0000-0000-0000-000000000000";
        assert_eq!(r.find_device(a), None);
        assert_eq!(r.claim_device(b, Some(1)), Some(1));
        assert_eq!(r.claim_device(a, Some(1)), Some(0), "1 is taken by b");
        assert_eq!(r.claim_device(&b.to_uppercase(), None), Some(1));
        assert_eq!(r.find_device(a), Some(0));
        assert_eq!(r.uuid(1), b);
        // The node agent's table wins; its text is matched too.
        r.set_uuid(5, "GPU-cccccccc-0000-0000-0000-000000000000");
        assert_eq!(
            r.find_device("GPU-CCCCCCCC-0000-0000-0000-000000000000"),
            Some(5)
        );
        // Racing claimers of different cards never share an index.
        let r = Arc::new(SharedRegion::anonymous().unwrap());
        let got: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|i| {
                    let r = &r;
                    s.spawn(move || {
                        r.claim_device(&format!("GPU-{i:08x}-0000-0000-0000-000000000000"), Some(0))
                            .unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut sorted = got.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 8, "{got:?}");
    }

    #[test]
    fn concurrent_reservations_never_overcommit() {
        let r = Arc::new(SharedRegion::anonymous().unwrap());
        let limit = 10_000u64;
        // Bytes admitted and not yet released, over all threads. (The raw sum
        // may briefly include a refused reservation before it is taken back.)
        let admitted = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let r = Arc::clone(&r);
                let admitted = Arc::clone(&admitted);
                std::thread::spawn(move || {
                    let slot = r.claim_slot(1000 + t, 0, 1).unwrap();
                    let mut held = 0u64;
                    for i in 0..20_000u64 {
                        if i % 3 == 2 && held >= 7 {
                            admitted.fetch_sub(7, SeqCst);
                            r.release(slot, 0, 7);
                            held -= 7;
                        } else if r.reserve(slot, 0, 7, limit).is_ok() {
                            admitted.fetch_add(7, SeqCst);
                            held += 7;
                        }
                        assert!(admitted.load(SeqCst) <= limit);
                    }
                    held
                })
            })
            .collect();
        let held: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(r.device_used(0), held);
        assert!(r.devices[0].peak_used.load(SeqCst) <= limit);
    }

    #[test]
    fn this_process_is_alive_and_pid_reuse_is_detected() {
        let me = std::process::id() as i32;
        let start = process_start_time(me);
        assert!(start > 0);
        assert!(process_alive(me, start));
        assert!(
            !process_alive(me, start + 1),
            "another start time = a recycled pid"
        );
        assert!(!process_alive(i32::MAX - 7, 0));
    }

    proptest! {
        /// Any sequence of reserves and releases keeps usage equal to the sum
        /// of what was admitted and never above the limit.
        #[test]
        fn accounting_model(ops in proptest::collection::vec((0usize..3, 0usize..2, 1u64..400, any::<bool>()), 1..200)) {
            let r = SharedRegion::anonymous().unwrap();
            let slots: Vec<usize> = (0..3).map(|i| r.claim_slot(500 + i, 0, 1).unwrap()).collect();
            let mut model = [[0u64; 2]; 3];
            for (p, d, n, alloc) in ops {
                if alloc {
                    let before: u64 = model.iter().map(|m| m[d]).sum();
                    let ok = r.reserve(slots[p], d, n, 1000).is_ok();
                    prop_assert_eq!(ok, before + n <= 1000);
                    if ok { model[p][d] += n; }
                } else {
                    r.release(slots[p], d, n);
                    model[p][d] = model[p][d].saturating_sub(n);
                }
                for dev in 0..2 {
                    prop_assert_eq!(r.device_used(dev), model.iter().map(|m| m[dev]).sum::<u64>());
                }
            }
        }
    }

    proptest! {
        #[test]
        fn any_recording_order_charges_the_union(
            iv in proptest::collection::vec((0u64..10_000, 1u64..2_000), 1..200)
        ) {
            let r = SharedRegion::anonymous().unwrap();
            let iv: Vec<(u64, u64)> = iv.into_iter().map(|(a, d)| (a, a + d)).collect();
            let charged: u64 = iv.iter().map(|&(a, b)| r.charge_interval(2, a, b)).sum();
            prop_assert_eq!(charged, union_len(&iv));
        }
    }
}
