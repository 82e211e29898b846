//! `hami-core`, built as `libvgpu.so`: the CUDA driver and NVML interposer
//! loaded into every process of a container (`/etc/ld.so.preload` or
//! `LD_PRELOAD`).
//!
//! It sits between the program and `libcuda.so.1` / `libnvidia-ml.so.1`:
//! * enforces per-device memory limits across all processes of the container
//!   (check and accounting are one atomic step in the shared region from
//!   `hami-shm`), on every allocation path ([`memory`]);
//! * shows the container its own view of the card ([`memory`], [`nvml`]);
//! * paces kernel launches to the container's compute quota with a feedback
//!   controller ([`pacing`]);
//! * intercepts programs linked against libcuda, programs that `dlsym` it,
//!   and the CUDA runtime's `cuGetProcAddress` path ([`dl`], [`procaddr`]).
//!
//! It must never hurt the host program: no panic crosses the FFI boundary
//! (each hook catches it and returns a CUDA error), no signal handlers, no
//! threads, no allocation or locking in `dlsym` or in fork/exit paths, no
//! dependencies beyond `hami-shm` and `libc`, and `CUDA_DISABLE_CONTROL=true`
//! forwards every call untouched.

#[macro_use]
mod log;
pub mod device;
pub mod dl;
mod ffi;
mod hooks;
mod hostpid;
pub mod memory;
pub mod nvml;
pub mod pacing;
pub mod procaddr;
mod state;
