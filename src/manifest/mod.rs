//! `tailnode inject`: applies the engine to every opted-in pod template of a multi-document YAML
//! stream and passes everything else through.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use crate::api::TailscaleNode;
use crate::inject::{ClusterFacts, InjectError, Outcome, Skip, WorkloadKind, inject_template};

/// Why a manifest stream could not be injected. Each message names the document and the field.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A document is not valid YAML.
    #[error("{source_name} document {doc}: invalid YAML: {source}")]
    Yaml {
        source_name: &'static str,
        doc: usize,
        #[source]
        source: serde_yaml::Error,
    },
    /// A TailscaleNode document does not match the schema's types.
    #[error("{at}: invalid TailscaleNode: field {field}: {message}")]
    NodeField { at: String, field: String, message: String },
    /// A TailscaleNode breaks one of the CRD's validation rules.
    #[error("{at}: invalid TailscaleNode {name}: {message}")]
    NodeRules { at: String, name: String, message: String },
    /// A pod template does not match the Pod schema.
    #[error("{at}: invalid pod template: field {field}: {message}")]
    Template { at: String, field: String, message: String },
    /// A pod names a TailscaleNode that is not in the input.
    #[error(
        "{at}: the pod template's label tailnode.dev/node={node} names a TailscaleNode that is not in the input; add it to the stream or pass --node FILE"
    )]
    MissingNode { at: String, node: String },
    /// The engine refused the pod.
    #[error("{at}: {source}")]
    Inject {
        at: String,
        #[source]
        source: InjectError,
    },
    /// Output could not be rendered.
    #[error("rendering {at}: {source}")]
    Render {
        at: String,
        #[source]
        source: serde_yaml::Error,
    },
}

/// Injects every opted-in pod template in `input`. TailscaleNodes come from `nodes` (a second
/// YAML stream) and from TailscaleNode documents in `input`, which are printed unchanged.
pub fn inject_manifests(input: &str, nodes: Option<&str>, facts: &ClusterFacts) -> Result<String, ManifestError> {
    let mut docs = parse_stream(input, "input")?;
    let mut known = Vec::new();
    if let Some(extra) = nodes {
        for (i, doc) in parse_stream(extra, "--node")?.iter().enumerate() {
            if kind_of(doc) == "TailscaleNode" {
                known.push(parse_node(doc, &format!("--node document {}", i + 1))?);
            }
        }
    }
    for (i, doc) in docs.iter().enumerate() {
        if kind_of(doc) == "TailscaleNode" {
            known.push(parse_node(doc, &format!("document {}", i + 1))?);
        }
    }
    let mut out = String::new();
    for (i, doc) in docs.iter_mut().enumerate() {
        let at = format!("document {} ({} {})", i + 1, kind_of(doc), name_of(doc));
        inject_document(doc, &known, facts, &at)?;
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml::to_string(doc).map_err(|source| ManifestError::Render { at, source })?);
    }
    Ok(out)
}

fn parse_stream(input: &str, source_name: &'static str) -> Result<Vec<Value>, ManifestError> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let value = Value::deserialize(de).map_err(|source| ManifestError::Yaml {
            source_name,
            doc: i + 1,
            source,
        })?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn kind_of(doc: &Value) -> &str {
    doc.get("kind").and_then(Value::as_str).unwrap_or("")
}

fn name_of(doc: &Value) -> &str {
    doc.get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn parse_node(doc: &Value, at: &str) -> Result<TailscaleNode, ManifestError> {
    let node: TailscaleNode = serde_path_to_error::deserialize(doc.clone()).map_err(|e| ManifestError::NodeField {
        at: at.to_string(),
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })?;
    node.validate_cel().map_err(|e| ManifestError::NodeRules {
        at: at.to_string(),
        name: node.metadata.name.clone().unwrap_or_default(),
        message: e.to_string(),
    })?;
    Ok(node)
}

/// Where the pod template sits in a document of this kind.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicationController" => {
            Some(&["spec", "template"])
        }
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

fn inject_document(
    doc: &mut Value,
    nodes: &[TailscaleNode],
    facts: &ClusterFacts,
    at: &str,
) -> Result<(), ManifestError> {
    let kind = kind_of(doc).to_string();
    let workload = if kind == "StatefulSet" {
        WorkloadKind::StatefulSet
    } else {
        WorkloadKind::Other
    };
    let namespace = doc
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let facts = ClusterFacts {
        workload,
        namespace: namespace.clone().or_else(|| facts.namespace.clone()),
        ..facts.clone()
    };
    if kind == "List" || kind.ends_with("List") {
        if let Some(items) = doc.get_mut("items").and_then(Value::as_sequence_mut) {
            for (j, item) in items.iter_mut().enumerate() {
                let item_at = format!("{at} item {} ({} {})", j + 1, kind_of(item), name_of(item));
                inject_document(item, nodes, &facts, &item_at)?;
            }
        }
        return Ok(());
    }
    if kind == "Pod" {
        let Some(map) = doc.as_mapping_mut() else { return Ok(()) };
        let mut template = Mapping::new();
        for key in ["metadata", "spec"] {
            if let Some(v) = map.get(key) {
                template.insert(key.into(), v.clone());
            }
        }
        if let Some(injected) = inject_value(Value::Mapping(template), nodes, namespace.as_deref(), &facts, at)? {
            for key in ["metadata", "spec"] {
                if let Some(v) = injected.get(key) {
                    map.insert(key.into(), v.clone());
                }
            }
        }
        return Ok(());
    }
    let Some(path) = template_path(&kind) else {
        return Ok(());
    };
    let mut slot = &mut *doc;
    for key in path {
        match slot.get_mut(*key) {
            Some(next) => slot = next,
            None => return Ok(()),
        }
    }
    if let Some(injected) = inject_value(slot.clone(), nodes, namespace.as_deref(), &facts, at)? {
        *slot = injected;
    }
    Ok(())
}

/// Injects one pod template; `None` when it is not opted in or already injected.
fn inject_value(
    template: Value,
    nodes: &[TailscaleNode],
    namespace: Option<&str>,
    facts: &ClusterFacts,
    at: &str,
) -> Result<Option<Value>, ManifestError> {
    let label = template
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(|l| l.get(crate::api::NODE_LABEL))
        .and_then(Value::as_str)
        .map(str::to_string);
    let Some(wanted) = label else { return Ok(None) };
    let node = nodes
        .iter()
        .find(|n| {
            n.metadata.name.as_deref() == Some(wanted.as_str())
                && (namespace.is_none()
                    || n.metadata.namespace.is_none()
                    || n.metadata.namespace.as_deref() == namespace)
        })
        .ok_or_else(|| ManifestError::MissingNode {
            at: at.to_string(),
            node: wanted.clone(),
        })?;
    let typed: PodTemplateSpec = serde_path_to_error::deserialize(template).map_err(|e| ManifestError::Template {
        at: at.to_string(),
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })?;
    match inject_template(&typed, node, facts).map_err(|source| ManifestError::Inject {
        at: at.to_string(),
        source,
    })? {
        Outcome::Injected { object, .. } | Outcome::Refreshed { object } => serde_yaml::to_value(&object)
            .map(Some)
            .map_err(|source| ManifestError::Render {
                at: at.to_string(),
                source,
            }),
        Outcome::Skipped(Skip::AlreadyInjected | Skip::NotOptedIn | Skip::OtherNode(_)) => Ok(None),
    }
}

#[cfg(test)]
mod tests;
