//! hami-api: the hami-rs data model and every wire format it shares with HAMi.
//!
//! Resource names, node device records, container requests, the allocation
//! annotations, policies and the `device-config.yaml` file, each with exactly
//! one encoder and one decoder. Everything here is pure data: no I/O, no
//! clocks, no global state. Decoders are total: bad input is an error that
//! names the annotation and the offending part, never a panic.

pub mod allocation;
pub mod annotations;
pub mod build_info;
pub mod config;
pub mod device;
pub mod error;
pub mod node;
pub mod node_config;
pub mod policy;
pub mod quantity;
pub mod request;
pub mod topology;
pub mod vendor_config;

pub use allocation::{ContainerDevice, ContainerDevices, PodDevices};
pub use config::{DeviceConfig, NvidiaConfig};
pub use device::{DeviceInfo, DeviceMode};
pub use error::DecodeError;
pub use request::{ContainerRequest, RequestError};

/// The vendor word HAMi writes in allocations for NVIDIA devices.
pub const NVIDIA: &str = "NVIDIA";
