//! hami-sched: the one hami-rs scheduling engine.
//!
//! Vendor backends, fit rules, GPU and node scoring, policies, the cluster
//! snapshot and the simulator. The extender, the `hami` CLI and the
//! benchmarks all call these functions; there is no second scheduler.
//!
//! Must never do I/O, read clocks, spawn threads or use randomness that is
//! not seeded by its caller: every decision is a pure, deterministic
//! function of a snapshot and a pod.

pub mod admission;
pub mod bind;
pub mod constraints;
pub mod engine;
pub mod reason;
pub mod score;
pub mod sim;
pub mod snapshot;
pub mod vendor;

pub use admission::{AdmissionOptions, ProtectedEnvMode};
pub use bind::{BindInFlight, BusyRule, LockHolder};
pub use constraints::{PodConstraints, Policies};
pub use engine::{Decision, Engine, Mode, PodError, PodRequest, PodScratch, pod_key};
pub use reason::{Reason, Rejection};
pub use snapshot::{NodeDevices, NodeState, PodRecord, Snapshot, Usage};
pub use vendor::{Admission, FitScratch, Nvidia, Vendor};
