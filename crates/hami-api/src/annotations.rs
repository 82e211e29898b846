//! Annotation and label keys of the HAMi wire contract (spec sections 2-6).

/// Node: the NVIDIA device list written by the device plugin.
pub const NODE_NVIDIA_REGISTER: &str = "hami.io/node-nvidia-register";
/// Node: handshake between the scheduler and the device plugin.
pub const NODE_HANDSHAKE: &str = "hami.io/node-handshake";
/// Node: optional topology pair scores between the node's GPUs.
pub const NODE_NVIDIA_SCORE: &str = "hami.io/node-nvidia-score";
/// Node: comma list of GPU UUIDs excluded from new allocations.
pub const DEVICE_CORDON: &str = "hami.io/device-cordon";
/// Node: the bind lock, `<RFC3339>,<namespace>,<pod>`.
pub const NODE_LOCK: &str = "hami.io/mutex.lock";
/// Node (hami-rs only): when hami-scheduler last freed cards on the node
/// with no other event (RFC 3339); changing it makes kube-scheduler try
/// unschedulable pods again.
pub const NODE_CARDS_FREED: &str = "hami.io/node-cards-freed";
/// Node (hami-rs only): how the node agent ties a container to its cards
/// ([`crate::node::AllocationMode`]); absent means HAMi's node lock.
pub const NODE_ALLOCATION_MODE: &str = "hami.io/node-allocation-mode";

/// Pod: the node the scheduler chose (also written as a label).
pub const VGPU_NODE: &str = "hami.io/vgpu-node";
/// Pod: unix seconds of the scheduling decision.
pub const VGPU_TIME: &str = "hami.io/vgpu-time";
/// Pod: NVIDIA devices the device plugin still has to hand out.
pub const NVIDIA_DEVICES_TO_ALLOCATE: &str = "hami.io/vgpu-devices-to-allocate";
/// Pod: NVIDIA devices allocated to the pod (what holds capacity).
pub const NVIDIA_DEVICES_ALLOCATED: &str = "hami.io/vgpu-devices-allocated";
/// Pod: `allocating`, `success` or `failed`.
pub const BIND_PHASE: &str = "hami.io/bind-phase";
/// Pod: unix seconds when the bind started.
pub const BIND_TIME: &str = "hami.io/bind-time";

/// Pod annotations only the scheduler and the device plugin may write: the
/// webhook removes them from pods being created, so a user cannot make a pod
/// count as holding cards it was never given (or hide what it holds).
pub const SCHEDULER_WRITTEN: [&str; 6] = [
    VGPU_NODE,
    VGPU_TIME,
    NVIDIA_DEVICES_TO_ALLOCATE,
    NVIDIA_DEVICES_ALLOCATED,
    BIND_PHASE,
    BIND_TIME,
];

/// Pod: node-level policy override (`binpack` | `spread`).
pub const NODE_SCHEDULER_POLICY: &str = "hami.io/node-scheduler-policy";
/// Pod: GPU-level policy override (`binpack` | `spread` | `topology-aware` | `mutex`, `,numa`).
pub const GPU_SCHEDULER_POLICY: &str = "hami.io/gpu-scheduler-policy";
/// Pod: weights of the GPU score terms, `slot=1,core=1,memory=3`.
pub const DEVICE_SCORING_WEIGHTS: &str = "hami.io/device-scoring-weights";

/// Pod: only cards whose type contains one of these (comma list, case-insensitive).
pub const NVIDIA_USE_GPUTYPE: &str = "nvidia.com/use-gputype";
/// Pod: never cards whose type contains one of these.
pub const NVIDIA_NOUSE_GPUTYPE: &str = "nvidia.com/nouse-gputype";
/// Pod: only cards with one of these UUIDs (comma list, exact).
pub const NVIDIA_USE_GPUUUID: &str = "nvidia.com/use-gpuuuid";
/// Pod: never cards with one of these UUIDs.
pub const NVIDIA_NOUSE_GPUUUID: &str = "nvidia.com/nouse-gpuuuid";
/// Pod: `hami-core`, `mig` or `mps`.
pub const NVIDIA_VGPU_MODE: &str = "nvidia.com/vgpu-mode";
/// Pod: `"true"` puts all GPUs of a container on one NUMA node.
pub const NVIDIA_NUMA_BIND: &str = "nvidia.com/numa-bind";

/// Pod or namespace label `hami.io/webhook=ignore` excludes it from the webhook.
pub const WEBHOOK_LABEL: &str = "hami.io/webhook";
/// The scheduler name pods are moved to.
pub const SCHEDULER_NAME: &str = "hami-scheduler";
