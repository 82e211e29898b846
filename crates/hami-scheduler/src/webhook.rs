//! The mutating admission webhook: AdmissionReview v1 (and v1beta1 for old
//! clusters) in, the engine's admission rules applied to the pod, a JSON
//! patch of what they changed (or a denial) out.

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use hami_api::annotations as ann;
use hami_sched::{Admission, Engine};

/// Why an AdmissionReview could not be answered at all (HTTP 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    #[error("apiVersion {0:?} is not admission.k8s.io/v1 or admission.k8s.io/v1beta1")]
    Version(String),
    #[error("kind {0:?} is not AdmissionReview")]
    Kind(String),
    #[error("AdmissionReview has no request")]
    NoRequest,
    #[error("AdmissionReview request has no uid")]
    NoUid,
}

/// Answers one AdmissionReview. `scheduler_name` is what GPU pods get.
pub fn review(engine: &Engine, scheduler_name: &str, body: &Value) -> Result<Value, ReviewError> {
    let version = body
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if version != "admission.k8s.io/v1" && version != "admission.k8s.io/v1beta1" {
        return Err(ReviewError::Version(version.to_string()));
    }
    let kind = body.get("kind").and_then(Value::as_str).unwrap_or_default();
    if kind != "AdmissionReview" {
        return Err(ReviewError::Kind(kind.to_string()));
    }
    let request = body.get("request").ok_or(ReviewError::NoRequest)?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or(ReviewError::NoUid)?;
    let response = decide(engine, scheduler_name, request);
    let mut response = response;
    response["uid"] = Value::String(uid.to_string());
    Ok(json!({
        "apiVersion": version,
        "kind": "AdmissionReview",
        "response": response,
    }))
}

fn allowed() -> Value {
    json!({"allowed": true})
}

fn denied(message: &str) -> Value {
    json!({"allowed": false, "status": {"code": 403, "reason": "Forbidden", "message": message}})
}

fn decide(engine: &Engine, scheduler_name: &str, request: &Value) -> Value {
    let is_pod = request.pointer("/kind/kind").and_then(Value::as_str) == Some("Pod")
        || request
            .pointer("/resource/resource")
            .and_then(Value::as_str)
            == Some("pods");
    let operation = request
        .get("operation")
        .and_then(Value::as_str)
        .unwrap_or("CREATE");
    if !is_pod || operation != "CREATE" {
        return allowed();
    }
    let Some(object) = request.get("object") else {
        return allowed();
    };
    let mut original: Pod = match serde_json::from_value(object.clone()) {
        Ok(p) => p,
        Err(e) => {
            return denied(&format!(
                "the pod in the admission request is not a valid Pod: {e}"
            ));
        }
    };
    // A pod being created often carries no namespace of its own; the
    // request names it (the protected-env allow list is per namespace).
    if original.metadata.namespace.is_none()
        && let Some(ns) = request.get("namespace").and_then(Value::as_str)
    {
        original.metadata.namespace = Some(ns.to_string());
    }
    let ignored = original
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ann::WEBHOOK_LABEL))
        .is_some_and(|v| v == "ignore");
    let mut pod = original.clone();
    let admission = if ignored {
        // Left alone, except that nobody but hami-rs writes allocations.
        if engine.strip_scheduler_written(&mut pod) {
            Admission::Mutated
        } else {
            Admission::Untouched
        }
    } else {
        engine.admit(&mut pod, scheduler_name)
    };
    match admission {
        Admission::Untouched => allowed(),
        Admission::Denied(message) => denied(&message),
        Admission::Mutated => {
            let before = serde_json::to_value(&original).unwrap_or(Value::Null);
            let after = serde_json::to_value(&pod).unwrap_or(Value::Null);
            let patch = json_patch::diff(&before, &after);
            if patch.0.is_empty() {
                return allowed();
            }
            let bytes = serde_json::to_vec(&patch).unwrap_or_default();
            json!({
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hami_sched::Policies;

    fn engine() -> Engine {
        Engine::new(Default::default(), Policies::default())
    }

    fn review_of(pod: Value, version: &str) -> Value {
        json!({
            "apiVersion": version,
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE",
                "namespace": "default",
                "object": pod,
            }
        })
    }

    fn gpu_pod(limits: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"containers": [{"name": "c", "image": "i", "resources": {"limits": limits}}]}
        })
    }

    fn apply(pod: &Value, resp: &Value) -> Value {
        let b64 = resp["response"]["patch"].as_str().expect("a patch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut out = pod.clone();
        json_patch::patch(&mut out, &patch).unwrap();
        out
    }

    #[test]
    fn gpumem_only_gets_a_gpu_and_our_scheduler() {
        for version in ["admission.k8s.io/v1", "admission.k8s.io/v1beta1"] {
            let pod = gpu_pod(json!({"nvidia.com/gpumem": "3000", "nvidia.com/priority": "0"}));
            let resp = review(
                &engine(),
                "hami-scheduler",
                &review_of(pod.clone(), version),
            )
            .unwrap();
            assert_eq!(resp["apiVersion"], version);
            assert_eq!(resp["response"]["uid"], "u-1");
            assert_eq!(resp["response"]["allowed"], true);
            assert_eq!(resp["response"]["patchType"], "JSONPatch");
            let out = apply(&pod, &resp);
            assert_eq!(out["spec"]["schedulerName"], "hami-scheduler");
            assert_eq!(
                out["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
                "1"
            );
            let env = &out["spec"]["containers"][0]["env"];
            assert!(
                env.as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["name"] == "CUDA_TASK_PRIORITY" && e["value"] == "0"),
                "{env}"
            );
        }
    }

    #[test]
    fn privileged_is_denied_with_the_rule() {
        let mut pod = gpu_pod(json!({"nvidia.com/gpu": "1"}));
        pod["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
        let resp = review(
            &engine(),
            "hami-scheduler",
            &review_of(pod, "admission.k8s.io/v1"),
        )
        .unwrap();
        assert_eq!(resp["response"]["allowed"], false);
        let msg = resp["response"]["status"]["message"].as_str().unwrap();
        assert!(
            msg.contains("privileged") && msg.contains("nvidia.com/gpu"),
            "{msg}"
        );
    }

    #[test]
    fn other_schedulers_and_plain_pods_are_untouched() {
        let mut pod = gpu_pod(json!({"nvidia.com/gpu": "1"}));
        pod["spec"]["schedulerName"] = json!("volcano");
        let resp = review(
            &engine(),
            "hami-scheduler",
            &review_of(pod, "admission.k8s.io/v1"),
        )
        .unwrap();
        assert_eq!(resp["response"], json!({"allowed": true, "uid": "u-1"}));
        let pod = gpu_pod(json!({"cpu": "1"}));
        let resp = review(
            &engine(),
            "hami-scheduler",
            &review_of(pod, "admission.k8s.io/v1"),
        )
        .unwrap();
        assert_eq!(resp["response"], json!({"allowed": true, "uid": "u-1"}));
    }

    #[test]
    fn malformed_reviews_are_errors() {
        assert_eq!(
            review(
                &engine(),
                "s",
                &json!({"apiVersion": "v1", "kind": "AdmissionReview"})
            ),
            Err(ReviewError::Version("v1".into()))
        );
        assert_eq!(
            review(
                &engine(),
                "s",
                &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"})
            ),
            Err(ReviewError::NoRequest)
        );
    }

    #[test]
    fn forged_allocations_are_stripped_even_from_ignored_pods() {
        let pod = json!({
            "metadata": {"name": "p",
                "labels": {"hami.io/webhook": "ignore"},
                "annotations": {"hami.io/vgpu-node": "n1",
                    "hami.io/vgpu-devices-allocated": "GPU-x,NVIDIA,1000,0:;",
                    "team": "ml"}},
            "spec": {"containers": [{"name": "c"}]},
        });
        let out = review(
            &engine(),
            "hami-scheduler",
            &review_of(pod, "admission.k8s.io/v1"),
        )
        .unwrap();
        assert_eq!(out["response"]["allowed"], true);
        let patch = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().expect("a patch"))
            .unwrap();
        let patch: Value = serde_json::from_slice(&patch).unwrap();
        let removed: Vec<&str> = patch
            .as_array()
            .unwrap()
            .iter()
            .map(|op| {
                assert_eq!(op["op"], "remove", "{patch}");
                op["path"].as_str().unwrap()
            })
            .collect();
        assert_eq!(
            removed.len(),
            2,
            "only the two forged keys go, nothing else changes: {patch}"
        );
        assert!(
            removed
                .iter()
                .all(|p| p.starts_with("/metadata/annotations/hami.io"))
        );
    }
}
