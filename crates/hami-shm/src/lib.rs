//! `hami-shm`: the formats the interposer (`libvgpu.so`) reads, defined once.
//!
//! * [`env`]: the environment variables the device plugin gives a container
//!   (`CUDA_DEVICE_MEMORY_LIMIT[_i]`, `CUDA_DEVICE_SM_LIMIT[_i]`, ...), parsed
//!   into [`env::InterposerEnv`].
//! * [`limits`]: the limits file the node agent writes into the container's
//!   mounted dir (same keys as the env, one `KEY=VALUE` per line); it has one
//!   encoder and one decoder, both here.
//! * [`region`]: the shared-region file (`CUDA_DEVICE_MEMORY_SHARED_CACHE`),
//!   a versioned `repr(C)` layout with per-process slots that are only ever
//!   updated with atomics, so a process killed at any instant leaves nothing
//!   locked, and its usage is reclaimed once its PID is gone.
//! * [`copy`]: a region read as a copy of its file's bytes and slots of dead
//!   processes freed without mapping it, for the node monitor (a file a
//!   container can truncate must never be mapped by the node agent).
//! * [`upstream`]: a read-only view of upstream HAMi-core's v1 cache file
//!   (magic 19920718), for node monitors during a migration.
//!
//! Used by `hami-core` (inside every CUDA process of a container), by the
//! node agent and by `hami run`. It must never pull in heavy dependencies
//! (libc only), never take a lock in the shared region, never panic on
//! malformed input (every parser returns an error or a warning), and never
//! spawn threads.

pub mod copy;
pub mod env;
pub mod limits;
pub mod region;
pub mod size;
pub mod upstream;

/// Most devices a container can see; the layouts and env indices use this.
pub const MAX_DEVICES: usize = 16;
