//! `sim-gpu`: a simulated CUDA driver and NVML for machines without a GPU.
//!
//! Built as `libsim_gpu.so`, it exports the subset of the CUDA driver API
//! (`cu*`) and NVML (`nvml*`) that hami-rs uses, so that the interposer, its
//! tests and `hami run` can run in CI. Load it through symlinks named
//! `libcuda.so.1` and `libnvidia-ml.so.1` placed in a directory on
//! `LD_LIBRARY_PATH`.
//!
//! What is simulated:
//! * devices described by [`config`] (`SIM_GPU_CONFIG` file or
//!   `SIM_GPU_DEVICES` inline text): count, names, UUIDs, memory, SM count;
//! * real bookkeeping of every allocation kind, with `CUDA_ERROR_OUT_OF_MEMORY`
//!   when the simulated card is full;
//! * kernel launches that occupy the device for `gridDimX*gridDimY*gridDimZ`
//!   microseconds (graph launches: 1000 us), serialised per device, with
//!   streams and events that complete when that time has passed;
//! * NVML utilisation computed from that busy time over the last second;
//! * the rest of NVML that unmodified clients (nvml-wrapper, pynvml,
//!   monitoring agents) call, with nvml.h's layouts: a modelled PCI
//!   address, NUMA node and topology per card, sensors that follow the
//!   utilisation, event sets that never fire, and `NVML_ERROR_NOT_SUPPORTED`
//!   for what is left out (see `nvml.rs`).
//!
//! A card is shared by every process on the machine that simulates the same
//! UUID with the same device list (a small mapped state file per card, see
//! `shared.rs`; `SIM_GPU_STATE_DIR` picks the directory), in containers
//! too, whatever their pid namespace (a container of `hami-node --sim`
//! finds its cards and the host's state under `/run/sim-gpu`, see
//! [`config`]): kernels of all of
//! them serialise on the card's busy timeline, memory is booked against the
//! card for all of them, and NVML reports the card's utilisation and
//! processes for all of them. It must never be shipped or loaded in
//! production; it is test and demo support only.

pub mod config;
mod cuda;
mod nvml;
mod shared;
mod state;
