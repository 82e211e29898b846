//! Reading Kubernetes objects and config files for the CLI. Every error
//! names the file, the document and the field.

use std::fmt;
use std::path::Path;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde::de::DeserializeOwned;

use hami_api::DeviceConfig;

/// Bad input: exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    pub file: String,
    /// 1-based YAML document number, when the error is inside one.
    pub document: Option<usize>,
    /// Dotted path of the field, when known.
    pub field: String,
    pub message: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(d) = self.document {
            write!(f, ": document {d}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for InputError {}

impl InputError {
    pub fn file(file: &str, message: impl Into<String>) -> InputError {
        InputError {
            file: file.to_string(),
            document: None,
            field: String::new(),
            message: message.into(),
        }
    }
}

pub fn read_text(path: &Path) -> Result<String, InputError> {
    std::fs::read_to_string(path)
        .map_err(|e| InputError::file(&path.display().to_string(), format!("cannot read: {e}")))
}

/// Splits YAML (or JSON) text into documents as JSON values; null documents are skipped.
pub fn documents(file: &str, text: &str) -> Result<Vec<(usize, serde_json::Value)>, InputError> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)
        .map_err(|e| InputError::file(file, format!("not valid YAML: {e}")))?;
    Ok(docs
        .into_iter()
        .enumerate()
        .filter(|(_, d)| !d.is_null())
        .map(|(i, d)| (i + 1, d))
        .collect())
}

/// Deserializes one value, reporting the path of the field that failed.
pub fn typed<T: DeserializeOwned>(
    file: &str,
    document: usize,
    prefix: &str,
    value: serde_json::Value,
) -> Result<T, InputError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = match (prefix.is_empty(), path == ".") {
            (true, _) => path,
            (false, true) => prefix.to_string(),
            (false, false) => format!("{prefix}.{path}"),
        };
        InputError {
            file: file.to_string(),
            document: Some(document),
            field,
            message: e.into_inner().to_string(),
        }
    })
}

/// Nodes and Pods from a file, as `kubectl get nodes,pods -A -o yaml`
/// prints them: a `List`, multi-document YAML, or both.
#[derive(Debug, Default)]
pub struct Objects {
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// Kinds we skipped, for a warning.
    pub skipped: Vec<String>,
}

pub fn load_objects(path: &Path) -> Result<Objects, InputError> {
    let file = path.display().to_string();
    parse_objects(&file, &read_text(path)?)
}

pub fn parse_objects(file: &str, text: &str) -> Result<Objects, InputError> {
    let mut objects = Objects::default();
    for (doc, value) in documents(file, text)? {
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        if kind == "List" || kind.ends_with("List") {
            let items = match value.get("items") {
                Some(serde_json::Value::Array(items)) => items.clone(),
                Some(serde_json::Value::Null) | None => Vec::new(),
                Some(_) => {
                    return Err(InputError {
                        file: file.to_string(),
                        document: Some(doc),
                        field: "items".into(),
                        message: "expected a list".into(),
                    });
                }
            };
            for (i, item) in items.into_iter().enumerate() {
                add_object(&mut objects, file, doc, &format!("items[{i}]"), item)?;
            }
        } else {
            add_object(&mut objects, file, doc, "", value)?;
        }
    }
    Ok(objects)
}

fn add_object(
    objects: &mut Objects,
    file: &str,
    doc: usize,
    prefix: &str,
    value: serde_json::Value,
) -> Result<(), InputError> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default();
    match kind {
        "Node" => objects.nodes.push(typed(file, doc, prefix, value)?),
        "Pod" => objects.pods.push(typed(file, doc, prefix, value)?),
        "" => {
            let field = if prefix.is_empty() {
                "kind".to_string()
            } else {
                format!("{prefix}.kind")
            };
            return Err(InputError {
                file: file.to_string(),
                document: Some(doc),
                field,
                message: "missing: expected a Kubernetes object (kind: Node, Pod or List)".into(),
            });
        }
        other => objects.skipped.push(other.to_string()),
    }
    Ok(())
}

/// Loads `device-config.yaml` (or the ConfigMap holding it); warnings go to stderr.
pub fn load_config(path: Option<&Path>) -> Result<DeviceConfig, InputError> {
    let Some(path) = path else {
        return Ok(DeviceConfig::default());
    };
    let file = path.display().to_string();
    let (config, warnings) =
        DeviceConfig::from_yaml(&file, &read_text(path)?).map_err(|e| InputError {
            file: e.file,
            document: None,
            field: e.key,
            message: e.message,
        })?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_and_documents() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n1}\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: p1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p2}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n";
        let o = parse_objects("f.yaml", text).unwrap();
        assert_eq!(o.nodes.len(), 1);
        assert_eq!(o.pods.len(), 2);
        assert_eq!(o.skipped, ["Service"]);
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let text = "kind: Pod\nmetadata: {name: ok}\n---\nkind: List\nitems:\n- kind: Pod\n  metadata: {name: p}\n  spec:\n    containers: 3\n";
        let e = parse_objects("pods.yaml", text).unwrap_err();
        assert_eq!(e.document, Some(2));
        assert_eq!(e.field, "items[0].spec.containers");
        assert!(
            e.to_string()
                .starts_with("pods.yaml: document 2: items[0].spec.containers: "),
            "{e}"
        );
        let e = parse_objects("x.yaml", "metadata: {}\n").unwrap_err();
        assert_eq!(e.field, "kind");
        let e = parse_objects("x.yaml", "a: [").unwrap_err();
        assert!(e.message.contains("not valid YAML"), "{e}");
    }
}
