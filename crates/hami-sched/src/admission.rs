//! The mutating webhook's pod-level rules (spec section 5): which pods are
//! ours, what is denied, and what every pod and every GPU pod gets. Vendor
//! backends add their per-container defaults through [`Vendor`]; the rules
//! that do not depend on the vendor live here once.

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, SecurityContext};

use hami_api::annotations as ann;

use crate::vendor::{Admission, Vendor};

/// What to do with a protected environment variable in a GPU container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtectedEnvMode {
    /// Deny the pod, naming the container and the variable.
    #[default]
    Deny,
    /// Remove the variable and admit the pod.
    Remove,
}

/// Scheduler-level admission settings (command-line flags of the shell,
/// not `device-config.yaml`). The default matches HAMi.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionOptions {
    /// HAMi's `--force-overwrite-default-scheduler` (default true): GPU pods
    /// that name `default-scheduler` (or no scheduler) are moved to ours.
    /// When false they keep the default scheduler.
    pub force_overwrite_default_scheduler: bool,
    /// What happens to GPU containers that set a [`is_protected_env`] variable.
    pub protected_env_mode: ProtectedEnvMode,
    /// Namespaces whose GPU containers may set protected variables (for
    /// example to debug the interposer).
    pub protected_env_namespaces: Vec<String>,
}

impl Default for AdmissionOptions {
    fn default() -> Self {
        AdmissionOptions {
            force_overwrite_default_scheduler: true,
            protected_env_mode: ProtectedEnvMode::Deny,
            protected_env_namespaces: Vec::new(),
        }
    }
}

/// Variables the interposer reads (hami-shm's `env.rs`) that switch it off,
/// point it at other files or libraries, or change the limits the device
/// plugin set. A container's own env wins over the device plugin's, so a
/// GPU container must not set them.
const PROTECTED_ENV: [&str; 9] = [
    "CUDA_DISABLE_CONTROL",
    "HAMI_LIMITS_FILE",
    "CUDA_DEVICE_MEMORY_SHARED_CACHE",
    "HAMI_REAL_LIBCUDA",
    "HAMI_REAL_LIBNVML",
    "CUDA_OVERSUBSCRIBE",
    "GPU_CORE_UTILIZATION_POLICY",
    "CUDA_DEVICE_MEMORY_LIMIT",
    "CUDA_DEVICE_SM_LIMIT",
];

/// Per-device forms `<name>_<index>` of these are protected too.
const PROTECTED_INDEXED_ENV: [&str; 2] = ["CUDA_DEVICE_MEMORY_LIMIT", "CUDA_DEVICE_SM_LIMIT"];

/// Whether a GPU container may not set this environment variable.
pub fn is_protected_env(name: &str) -> bool {
    PROTECTED_ENV.contains(&name)
        || PROTECTED_INDEXED_ENV.iter().any(|base| {
            name.strip_prefix(base)
                .and_then(|rest| rest.strip_prefix('_'))
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// What the vendor's per-container rules did to one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ContainerAdmission {
    /// The container asks for the vendor's devices.
    pub managed: bool,
    /// The container was changed (defaults or env added).
    pub changed: bool,
}

/// The webhook's rules for a pod being created, applied in place. GPU pods
/// of the default scheduler go to `scheduler_name`.
pub fn admit(
    vendors: &[&dyn Vendor],
    options: &AdmissionOptions,
    pod: &mut Pod,
    scheduler_name: &str,
) -> Admission {
    let stripped = strip_scheduler_written(vendors, pod);
    let pod_annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let unchanged = if stripped {
        Admission::Mutated
    } else {
        Admission::Untouched
    };
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let env_allowed = options
        .protected_env_namespaces
        .iter()
        .any(|n| n == namespace);
    let Some(spec) = pod.spec.as_mut().filter(|s| !s.containers.is_empty()) else {
        return Admission::Denied(
            "pod has no containers: spec.containers must name at least one".into(),
        );
    };
    // The API server defaults an empty name to default-scheduler before
    // admission; an empty name is taken the same way.
    let named = spec.scheduler_name.as_deref().unwrap_or_default();
    let is_default = named.is_empty() || named == "default-scheduler";
    let ours = named == scheduler_name || (is_default && options.force_overwrite_default_scheduler);
    if !ours {
        return unchanged;
    }
    // Per container in allocation order: whether it asks for devices.
    let mut gpu = Vec::new();
    // Vendors some container asks for, in engine order.
    let mut asked = vec![false; vendors.len()];
    let mut changed = stripped;
    let containers = spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(spec.containers.iter_mut());
    for container in containers {
        let mut managed = false;
        for (v, vendor) in vendors.iter().enumerate() {
            match vendor.admit_container(container, &pod_annotations) {
                Ok(a) => {
                    managed |= a.managed;
                    asked[v] |= a.managed;
                    changed |= a.changed;
                }
                Err(message) => return Admission::Denied(message),
            }
        }
        gpu.push(managed);
    }
    if !gpu.contains(&true) {
        return if changed {
            Admission::Mutated
        } else {
            Admission::Untouched
        };
    }
    let used: Vec<&dyn Vendor> = vendors
        .iter()
        .zip(&asked)
        .filter_map(|(v, &a)| a.then_some(*v))
        .collect();
    let resource = used
        .iter()
        .map(|v| v.count_resource())
        .collect::<Vec<_>>()
        .join(", ");
    let privileged = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .map(|c| (&c.name, &c.security_context))
        .chain(
            spec.ephemeral_containers
                .iter()
                .flatten()
                .map(|c| (&c.name, &c.security_context)),
        )
        .find(|(_, sc)| is_privileged(sc.as_ref()));
    if let Some((name, _)) = privileged {
        return Admission::Denied(format!(
            "container {name:?} is privileged and the pod asks for {resource}: a privileged container sees every GPU of the node, so the pod's limits cannot be enforced; drop privileged or the GPU resources"
        ));
    }
    if let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        return Admission::Denied(format!(
            "pod sets spec.nodeName={node:?} and asks for {resource}: pods with GPU resources must be placed by {scheduler_name}, remove spec.nodeName"
        ));
    }
    if !env_allowed {
        let written: Vec<(&'static str, String)> =
            used.iter().flat_map(|v| v.admission_env()).collect();
        let gpu_containers = spec
            .init_containers
            .iter_mut()
            .flatten()
            .chain(spec.containers.iter_mut())
            .zip(&gpu)
            .filter_map(|(c, &is_gpu)| is_gpu.then_some(c));
        for container in gpu_containers {
            if let Err(message) =
                guard_env(container, &written, options.protected_env_mode, namespace)
            {
                return Admission::Denied(message);
            }
        }
    }
    spec.scheduler_name = Some(scheduler_name.to_string());
    for vendor in &used {
        if let Err(message) = vendor.admit_gpu_pod(pod) {
            return Admission::Denied(message);
        }
    }
    Admission::Mutated
}

fn is_privileged(sc: Option<&SecurityContext>) -> bool {
    sc.and_then(|s| s.privileged).unwrap_or(false)
}

/// Removes the annotations only the scheduler and the device plugin write.
/// Returns whether any was there.
pub fn strip_scheduler_written(vendors: &[&dyn Vendor], pod: &mut Pod) -> bool {
    let Some(annotations) = pod.metadata.annotations.as_mut() else {
        return false;
    };
    let mut removed = false;
    for key in ann::SCHEDULER_WRITTEN {
        removed |= annotations.remove(key).is_some();
    }
    for vendor in vendors {
        let (to_allocate, allocated) = vendor.allocation_annotations();
        for key in to_allocate.into_iter().chain([allocated]) {
            removed |= annotations.remove(key).is_some();
        }
        for key in vendor.plugin_annotation_keys() {
            removed |= annotations.remove(&key).is_some();
        }
    }
    removed
}

/// Applies the protected-environment rule to one GPU container. `written`
/// is what the webhook itself sets; those values are not the user's.
fn guard_env(
    container: &mut Container,
    written: &[(&'static str, String)],
    mode: ProtectedEnvMode,
    namespace: &str,
) -> Result<(), String> {
    let Some(vars) = container.env.as_mut() else {
        return Ok(());
    };
    let ours = |e: &EnvVar| {
        e.value_from.is_none()
            && written
                .iter()
                .any(|(n, v)| *n == e.name && e.value.as_deref() == Some(v.as_str()))
    };
    let forbidden = |e: &EnvVar| is_protected_env(&e.name) && !ours(e);
    match mode {
        ProtectedEnvMode::Remove => vars.retain(|e| !forbidden(e)),
        ProtectedEnvMode::Deny => {
            if let Some(e) = vars.iter().find(|e| forbidden(e)) {
                return Err(format!(
                    "container {:?} sets {}: it switches off, redirects or changes the GPU interposer's limits, so GPU containers may not set it (namespace {namespace:?} is not allowed to)",
                    container.name, e.name
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_names() {
        for n in [
            "CUDA_DISABLE_CONTROL",
            "CUDA_DEVICE_MEMORY_LIMIT",
            "CUDA_DEVICE_MEMORY_LIMIT_0",
            "CUDA_DEVICE_SM_LIMIT_15",
            "HAMI_REAL_LIBCUDA",
        ] {
            assert!(is_protected_env(n), "{n}");
        }
        for n in [
            "CUDA_DEVICE_MEMORY_LIMIT_",
            "CUDA_DEVICE_MEMORY_LIMIT_X",
            "CUDA_TASK_PRIORITY",
            "CUDA_VISIBLE_DEVICES",
            "PATH",
        ] {
            assert!(!is_protected_env(n), "{n}");
        }
    }
}
