//! hami-node: the hami-rs node agent.
//!
//! What exists now: card discovery, node registration, and the kubelet
//! device plugin (API v1beta1, gRPC over unix sockets) with HAMi's
//! Allocate protocol:
//!
//! * [`discovery`]: the node's cards from NVML (loaded at run time) and
//!   HAMi's per-node `config.json`;
//! * [`registration`]: `hami.io/node-nvidia-register`, the handshake,
//!   rescans, removal on shutdown; feeds the plugin's card channel;
//! * [`proto`]: the device plugin API, compiled from our own `.proto`;
//! * [`devices`]: the virtual devices advertised for the node's cards;
//! * [`allocate`]: the pure part of Allocate (pod + request -> container
//!   responses and the annotation left to allocate);
//! * [`lockfree`]: allocation without the node lock (PreStartContainer
//!   and the kubelet's PodResources API);
//! * [`pod_resources`]: the PodResources client;
//! * [`nri`]: the NRI plugin (multiplexer, registration, Configure,
//!   Synchronize, CreateContainer) and its decisions for this node;
//! * [`pending`]: the Kubernetes side of Allocate (find the pod, patch it,
//!   release the node lock, write events);
//! * [`plugin`]: the `DevicePlugin` gRPC service and its unix socket server;
//! * [`register`]: the `Registration` client;
//! * [`monitor`]: per-container usage from the shared regions, dead
//!   processes' slots, dirs of pods that are gone;
//! * [`monitor_http`]: the monitor's loop, its pod watch and its metrics
//!   listener;
//! * [`priority`]: holds low-priority containers while a high-priority
//!   one is busy on the same card.
//!
//! MIG and topology scores are still to come (docs/node.md).

pub mod allocate;
pub mod devices;
pub mod discovery;
pub mod install;
pub mod lockfree;
pub mod monitor;
pub mod monitor_http;
pub mod nri;
pub mod pending;
pub mod plugin;
pub mod pod_resources;
pub mod priority;
pub mod register;
pub mod registration;

/// The kubelet device plugin API, package `v1beta1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("v1beta1");
}

/// The kubelet's PodResources API, package `v1` (only what hami-node reads).
pub mod proto_podresources {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("v1");
}

/// NRI's messages, package `nri.pkg.api.v1alpha1` (only what hami-node
/// reads or writes; the services are called by name over ttrpc).
pub mod proto_nri {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("nri.pkg.api.v1alpha1");
}

/// The API version a plugin registers with.
pub const API_VERSION: &str = "v1beta1";
