//! hami-kube: the Kubernetes glue shared by the hami-rs binaries.
//!
//! Client setup ([`client`]), watch-based caches ([`cache`]), the node bind
//! lock ([`lock`]), pod patches and the binding subresource ([`pod`]),
//! events ([`events`]), Lease-based leader election ([`leader`]) and the
//! node handshake and health rules ([`handshake`]), with an injectable
//! clock ([`clock`]).
//!
//! This crate does I/O for the binaries; it must never make a scheduling
//! decision (that is `hami-sched`'s job) nor define a wire format (that is
//! `hami-api`'s job): it only moves values those crates define.

pub mod cache;
pub mod client;
pub mod clock;
pub mod error;
pub mod events;
pub mod handshake;
pub mod leader;
pub mod lock;
pub mod pod;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::Error;

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
