//! Vendor backends. A backend is data plus one trait: it decodes a node's
//! registration, parses a pod's requests, fits one container onto a node's
//! cards, names its allocation annotations and applies its admission rules.
//! Adding a vendor touches one module here and one config section.

pub mod nvidia;

use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec};

use hami_api::{ContainerRequest, DecodeError, RequestError};

use crate::admission::ContainerAdmission;
use crate::constraints::PodConstraints;
use crate::reason::Rejection;
use crate::snapshot::{NodeDevices, NodeState, Usage};

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

/// One accelerator vendor's rules.
pub trait Vendor: Send + Sync {
    /// The word written in allocations, e.g. `NVIDIA`.
    fn word(&self) -> &'static str;

    /// Node annotation holding the vendor's device list.
    fn register_annotation(&self) -> &'static str;

    /// Pod annotations `(to-allocate, allocated)` for this vendor.
    fn allocation_annotations(&self) -> (&'static str, &'static str);

    /// The node's cards, cordon list and link scores; `Ok(None)` when the
    /// node has registered none of this vendor's devices.
    fn decode_node(&self, node: &Node) -> Result<Option<NodeDevices>, DecodeError>;

    /// Every container's request, in allocation order (init containers first).
    fn pod_requests(&self, pod: &Pod) -> Result<Vec<Option<ContainerRequest>>, RequestError>;

    /// Picks cards for one container given the node's current `used` per
    /// card (index-aligned with `node.devices`). On success
    /// `scratch.picked` holds the chosen card indices in allocation order.
    fn fit_container(
        &self,
        node: &NodeState,
        used: &[Usage],
        request: &ContainerRequest,
        constraints: &PodConstraints,
        scratch: &mut FitScratch,
    ) -> Result<(), Rejection>;

    /// Whether one container fits, without choosing cards, when the answer
    /// (and every rejection count) does not depend on the order cards are
    /// tried in; `None` when it does and [`Vendor::fit_container`] must run.
    /// Lets the engine explain thousands of nodes without ranking cards.
    fn container_fits_unordered(
        &self,
        node: &NodeState,
        request: &ContainerRequest,
        constraints: &PodConstraints,
    ) -> Option<Result<(), Rejection>>;

    /// The resource that asks for a number of devices, for messages.
    fn count_resource(&self) -> &str;

    /// Applies the vendor's admission defaults to one container (init or
    /// app) of a pod being created; `Err` denies the pod with a message
    /// naming the container, resource, value and rule.
    fn admit_container(&self, container: &mut Container) -> Result<ContainerAdmission, String>;

    /// Pod-level defaults for an admitted pod that asks for devices.
    fn admit_gpu_pod(&self, spec: &mut PodSpec);

    /// Environment the webhook itself writes into every GPU container,
    /// whatever the pod (exempt from the protected-environment rule).
    fn admission_env(&self) -> Vec<(&'static str, String)>;
}
