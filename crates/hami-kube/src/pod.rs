//! Pod writes: annotation and label patches and the `pods/binding`
//! subresource.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Map, Value, json};

use crate::{Error, Result};

/// Sets (`Some`) or removes (`None`) annotations and labels of a pod with
/// one merge patch. With `uid` the patch fails if the pod was replaced by
/// another of the same name.
pub async fn patch_metadata(
    client: &Client,
    namespace: &str,
    name: &str,
    uid: Option<&str>,
    annotations: &BTreeMap<String, Option<String>>,
    labels: &BTreeMap<String, Option<String>>,
) -> Result<Pod> {
    let to_map = |m: &BTreeMap<String, Option<String>>| {
        m.iter()
            .map(|(k, v)| (k.clone(), v.clone().map_or(Value::Null, Value::String)))
            .collect::<Map<String, Value>>()
    };
    let mut metadata = Map::new();
    if !annotations.is_empty() {
        metadata.insert("annotations".into(), Value::Object(to_map(annotations)));
    }
    if !labels.is_empty() {
        metadata.insert("labels".into(), Value::Object(to_map(labels)));
    }
    if let Some(uid) = uid {
        metadata.insert("uid".into(), Value::String(uid.to_string()));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "metadata": metadata })),
    )
    .await
    .map_err(|e| Error::api(format!("patch pod {namespace}/{name}"), e))
}

/// Binds a pod to a node through the `pods/binding` subresource. With `uid`
/// the API server refuses to bind a different pod of the same name.
///
/// The API server copies a Binding's annotations onto the pod in the same
/// write that sets its node, so `annotations` land if and only if the pod
/// is bound: never on a pod that is already bound elsewhere, never missing
/// from a bound one.
pub async fn bind(
    client: &Client,
    namespace: &str,
    name: &str,
    uid: Option<&str>,
    node: &str,
    annotations: BTreeMap<String, String>,
) -> Result<()> {
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            uid: uid.map(str::to_string),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.to_string()),
            ..Default::default()
        },
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.create_subresource::<_, Value>("binding", name, &PostParams::default(), &binding)
        .await
        .map_err(|e| Error::api(format!("bind pod {namespace}/{name} to node {node}"), e))?;
    Ok(())
}
