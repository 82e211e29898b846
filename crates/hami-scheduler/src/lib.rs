//! hami-scheduler: the kube-scheduler extender (Filter, Bind), the mutating
//! admission webhook and the scheduler metrics of hami-rs, wire-compatible
//! with HAMi.
//!
//! Every handler is "decode request -> `hami-sched` engine call -> encode
//! response"; the Kubernetes I/O goes through `hami-kube`. This crate must
//! never make a placement decision of its own: there is one engine.

pub mod app;
pub mod certgen;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod extender;
pub mod metrics;
pub mod requeue;
pub mod run;
pub mod state;
pub mod tls;
pub mod tool;
pub mod usage;
pub mod webhook;

pub use error::Error;
