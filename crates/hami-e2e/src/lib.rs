//! hami-e2e: a real Kubernetes control plane on loopback for the hami-rs
//! end-to-end tests.
//!
//! [`cluster`] starts, once per test binary, etcd, kube-apiserver,
//! hami-scheduler (the binary under test), kube-scheduler configured with
//! our extender, and kwok (fake nodes and pods), with certificates made on
//! the spot, and registers our MutatingWebhookConfiguration. Everything is
//! stopped and its directory deleted when the test binary exits, panics
//! included. Each test works in its own [`TestNs`]: a namespace plus nodes
//! that only its pods can land on, deleted when the guard drops.
//!
//! The control-plane binaries come from `tests/e2e/build-k8s.sh`. When they
//! are missing, [`cluster`] prints why and returns `None` so the test can
//! skip, unless `HAMI_E2E_REQUIRE=1`, which turns a skip into a failure.
//!
//! Test support only: never a dependency of a shipped crate.

pub mod certs;
mod cluster;
pub mod image;
mod lockwatch;
mod procs;
mod realnode;
mod testns;

pub use cluster::{
    Cluster, HA_LEASE, HA_MAIN_HOST, Replica, cluster, cluster_ha, cluster_with, control_plane,
    deploy_cluster,
};
pub use lockwatch::LockWatch;
pub use procs::{kill as kill_child, spawn as spawn_child};
pub use realnode::{BUSYBOX_IMAGE, DEVICE_PLUGIN_DIR, PAUSE_IMAGE, REAL_NODE, RealNode};
pub use testns::{GpuNode, TestNs, wait_for};
