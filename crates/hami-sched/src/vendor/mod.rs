//! Vendor backends. A backend is data plus one trait: it decodes a node's
//! registration, parses a pod's requests, fits one container onto a node's
//! cards, names its allocation annotations and applies its admission rules.
//! NVIDIA and Ascend have modules of their own; the vendors whose rules are
//! HAMi's shared per-card rule with units, defaults and a few switches are
//! one [`Generic`] backend each, described by data ([`generic::Spec`]).

pub mod ascend;
pub mod enflame_drs;
pub mod generic;
pub mod neuron;
pub mod nvidia;
pub mod shared;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use k8s_openapi::api::core::v1::{Container, Node, Pod};

use hami_api::policy::NodePolicy;

use hami_api::{
    ContainerDevice, ContainerRequest, DecodeError, DeviceInfo, PodDevices, RequestError,
};

use crate::admission::ContainerAdmission;
use crate::constraints::PodConstraints;
use crate::reason::Rejection;
use crate::snapshot::{NodeDevices, NodeState, Usage};

pub use ascend::Ascend;
pub use enflame_drs::EnflameDrs;
pub use generic::Generic;
pub use neuron::Neuron;
pub use nvidia::Nvidia;

/// Buffers a backend reuses from card to card and node to node, so that
/// explaining 10,000 nodes allocates nothing per node.
#[derive(Debug, Default)]
pub struct FitScratch {
    /// (score, tie key, card index) in preference order.
    pub keyed: Vec<(f64, i32, usize)>,
    /// Cards that passed every rule, in preference order.
    pub fitting: Vec<usize>,
    /// The cards chosen for the container, in allocation order.
    pub picked: Vec<usize>,
}

/// What the admission webhook does with a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Not ours to touch (another scheduler, or no managed resources).
    Untouched,
    /// The pod was changed in place and may be created.
    Mutated,
    /// The pod must be rejected; the message names resource, value and rule.
    Denied(String),
}

/// What a backend may look at while fitting one container, besides the
/// node: the pod's decoded constraints, its annotations (vendor-specific
/// selectors and modes) and the cards this vendor already gave earlier
/// containers of the same pod.
#[derive(Debug, Clone, Copy)]
pub struct FitPod<'a> {
    pub constraints: &'a PodConstraints,
    pub annotations: &'a BTreeMap<String, String>,
    /// Node card indices, in allocation order.
    pub earlier: &'a [usize],
}

/// A decision as a vendor's plugin notes see it.
#[derive(Debug, Clone, Copy)]
pub struct Placed<'a> {
    pub node: &'a str,
    /// The node's cards as the scheduler sees them, when at hand.
    pub state: Option<&'a NodeState>,
    /// This vendor's entries, per container in allocation order.
    pub devices: &'a PodDevices,
    /// This vendor's request per container, when known (else empty).
    pub asked: &'a [Option<&'a ContainerRequest>],
    /// Container names in allocation order, when known (else empty).
    pub containers: &'a [String],
    /// Unix nanoseconds.
    pub now_ns: i128,
}

/// Seconds after which a vendor plugin's own node lock
/// ([`Vendor::plugin_lock_key`]) is taken to be abandoned (HAMi: 2 minutes).
pub const PLUGIN_LOCK_EXPIRY_SECS: i64 = 120;

/// One accelerator vendor's rules.
///
/// A node's cards are one list; each vendor's cards are a contiguous range
/// of it (`cards`), and a backend only ever looks inside its range.
pub trait Vendor: Send + Sync + fmt::Debug {
    /// The word written in allocations, e.g. `NVIDIA`, `MLU`, `Ascend910B3`.
    fn word(&self) -> &str;

    /// Pod annotations `(to-allocate, allocated)` for this vendor; some
    /// vendors' plugins read only the allocated key.
    fn allocation_annotations(&self) -> (Option<&str>, &str);

    /// Whether an allocation entry is this vendor's. The entry's type is
    /// the vendor word, except where a vendor writes the card model.
    fn owns(&self, entry: &ContainerDevice) -> bool {
        entry.vendor == self.word()
    }

    /// The type an allocation entry on `card` carries: the vendor word,
    /// or the card's model for vendors whose plugins expect that (AMD).
    fn entry_type<'a>(&'a self, _card: &'a DeviceInfo) -> &'a str {
        self.word()
    }

    /// Whether a bind of this vendor's devices takes HAMi's node lock
    /// (`hami.io/mutex.lock`), which the vendor's plugin releases once it
    /// has handed the devices out. Plugins that never take part in it
    /// (Moore Threads, MetaX whole cards, Enflame, Kunlunxin XPU, AWS
    /// Neuron, and Cambricon, whose lock is its own) would leave it held.
    fn uses_node_lock(&self) -> bool {
        true
    }

    /// The node annotation of a lock the vendor's own plugin keeps instead,
    /// when binding `pod` takes it (Cambricon's `cambricon.com/dsmlu.lock`:
    /// the bind's time in RFC 3339, removed by the plugin once it has
    /// allocated; binds wait while one younger than
    /// [`PLUGIN_LOCK_EXPIRY_SECS`] is on the node).
    fn plugin_lock_key(&self, pod: &Pod) -> Option<&str> {
        let _ = pod;
        None
    }

    /// The node annotation this vendor's plugin registers its cards in,
    /// for vendors that use one.
    fn register_key(&self) -> Option<&str> {
        None
    }

    /// The node annotation of the handshake between the scheduler and this
    /// vendor's plugin (`hami.io/node-handshake-<vendor>`), if it has one.
    /// NVIDIA's (`hami.io/node-handshake`) is the shell's own.
    fn handshake_key(&self) -> Option<&str> {
        None
    }

    /// The node's cards of this vendor; `Ok(None)` when it has none.
    fn decode_node(&self, node: &Node) -> Result<Option<NodeDevices>, DecodeError>;

    /// Every container's request, in allocation order (init containers first).
    fn pod_requests(&self, pod: &Pod) -> Result<Vec<Option<ContainerRequest>>, RequestError>;

    /// Picks cards for one container among `cards` given the node's current
    /// `used` per card (index-aligned with `node.devices`). On success
    /// `scratch.picked` holds the chosen card indices in allocation order.
    fn fit_container(
        &self,
        node: &NodeState,
        cards: Range<usize>,
        used: &[Usage],
        request: &ContainerRequest,
        pod: &FitPod<'_>,
        scratch: &mut FitScratch,
    ) -> Result<(), Rejection>;

    /// Whether one container fits, without choosing cards, when the answer
    /// (and every rejection count) does not depend on the order cards are
    /// tried in; `None` when it does and [`Vendor::fit_container`] must run.
    /// Lets the engine explain thousands of nodes without ranking cards.
    fn container_fits_unordered(
        &self,
        _node: &NodeState,
        _cards: Range<usize>,
        _request: &ContainerRequest,
        _pod: &FitPod<'_>,
    ) -> Option<Result<(), Rejection>> {
        None
    }

    /// Whether the vendor adds a score of its own to the node score
    /// ([`Vendor::node_score`]).
    fn scores_nodes(&self) -> bool {
        false
    }

    /// The vendor's addition to a node's score for the cards it chose
    /// (node card indices, per container), added raw as HAMi adds it.
    fn node_score(&self, _node: &NodeState, _cards: &[Vec<usize>], _policy: NodePolicy) -> f64 {
        0.0
    }

    /// What one container takes on a chosen card: (MiB, cores in the
    /// vendor's unit). Most vendors take what was asked.
    fn take(&self, card: &DeviceInfo, _used: Usage, request: &ContainerRequest) -> (u64, u32) {
        (request.mem_on(card.devmem), request.cores)
    }

    /// The resource that asks for a number of devices, for messages.
    fn count_resource(&self) -> &str;

    /// Applies the vendor's admission defaults to one container (init or
    /// app) of a pod being created; `Err` denies the pod with a message
    /// naming the container, resource, value and rule.
    fn admit_container(
        &self,
        container: &mut Container,
        pod_annotations: &BTreeMap<String, String>,
    ) -> Result<ContainerAdmission, String>;

    /// Pod-level changes for an admitted pod that asks for this vendor's
    /// devices (runtime class, pod annotations its plugin reads).
    fn admit_gpu_pod(&self, _pod: &mut Pod) -> Result<(), String> {
        Ok(())
    }

    /// Environment the webhook itself writes into every GPU container,
    /// whatever the pod (exempt from the protected-environment rule).
    fn admission_env(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// Pod annotations this vendor's device plugin reads besides the
    /// allocation pair, for an allocation of this vendor's devices.
    fn plugin_annotations(&self, _placed: &Placed<'_>) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Every pod annotation key [`Vendor::plugin_annotations`] may write:
    /// only the scheduler writes them, so the webhook strips them.
    fn plugin_annotation_keys(&self) -> Vec<String> {
        Vec::new()
    }
}
