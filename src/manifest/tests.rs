use serde_yaml::Value;

use super::*;

const NODE: &str = r#"
apiVersion: tailnode.dev/v1alpha1
kind: TailscaleNode
metadata: {name: web, namespace: apps}
spec:
  hostname: web
  tags: ["tag:k8s"]
"#;

fn template(kind: &str, api: &str, label: bool) -> String {
    let labels = if label {
        "{app: web, tailnode.dev/node: web}"
    } else {
        "{app: web}"
    };
    let pod_spec = "{containers: [{name: app, image: nginx}]}";
    match kind {
        "Pod" => format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: apps, labels: {labels}}}\nspec: {pod_spec}\n"
        ),
        "CronJob" => format!(
            "apiVersion: {api}\nkind: CronJob\nmetadata: {{name: c}}\nspec:\n  schedule: '* * * * *'\n  jobTemplate:\n    spec:\n      template:\n        metadata: {{labels: {labels}}}\n        spec: {pod_spec}\n"
        ),
        _ => format!(
            "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: w}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {labels}}}\n    spec: {pod_spec}\n"
        ),
    }
}

fn docs(out: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(out)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

fn containers_at<'a>(doc: &'a Value, path: &[&str]) -> Vec<&'a str> {
    let mut v = doc;
    for k in path {
        v = &v[*k];
    }
    let spec = &v["spec"];
    spec["initContainers"]
        .as_sequence()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_sequence().into_iter().flatten())
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

#[test]
fn every_workload_kind_is_injected() {
    let kinds = [
        ("Pod", "v1", vec![]),
        ("Deployment", "apps/v1", vec!["spec", "template"]),
        ("StatefulSet", "apps/v1", vec!["spec", "template"]),
        ("DaemonSet", "apps/v1", vec!["spec", "template"]),
        ("ReplicaSet", "apps/v1", vec!["spec", "template"]),
        ("Job", "batch/v1", vec!["spec", "template"]),
        ("CronJob", "batch/v1", vec!["spec", "jobTemplate", "spec", "template"]),
    ];
    for (kind, api, path) in kinds {
        let input = format!("{NODE}---\n{}", template(kind, api, true));
        let out = inject_manifests(&input, None, &ClusterFacts::default()).unwrap();
        let d = docs(&out);
        assert_eq!(d.len(), 2, "{kind}");
        assert_eq!(d[0], docs(NODE)[0], "the TailscaleNode is printed unchanged");
        assert_eq!(containers_at(&d[1], &path), ["tailscale", "app"], "{kind}");
    }
}

#[test]
fn statefulset_templates_use_ordinals() {
    let input = template("StatefulSet", "apps/v1", true);
    let out = inject_manifests(&input, Some(NODE), &ClusterFacts::default()).unwrap();
    assert!(out.contains("web-$(TS_POD_INDEX)"), "{out}");
    let dep = inject_manifests(
        &template("Deployment", "apps/v1", true),
        Some(NODE),
        &ClusterFacts::default(),
    )
    .unwrap();
    assert!(dep.contains("web-$(POD_NAME)"), "{dep}");
}

#[test]
fn unlabelled_and_other_documents_pass_through_unchanged() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}]}\n";
    let plain = template("Deployment", "apps/v1", false);
    let input = format!("{svc}---\n{plain}---\n");
    let out = inject_manifests(&input, Some(NODE), &ClusterFacts::default()).unwrap();
    assert_eq!(docs(&out), docs(&format!("{svc}---\n{plain}")));
}

#[test]
fn lists_are_walked() {
    let item = template("Deployment", "apps/v1", true).replace('\n', "\n    ");
    let input = format!("apiVersion: v1\nkind: List\nitems:\n  - {item}");
    let out = inject_manifests(&input, Some(NODE), &ClusterFacts::default()).unwrap();
    let d = docs(&out);
    assert_eq!(
        containers_at(&d[0]["items"][0], &["spec", "template"]),
        ["tailscale", "app"]
    );
}

#[test]
fn injecting_injected_output_changes_nothing() {
    let input = format!("{NODE}---\n{}", template("Deployment", "apps/v1", true));
    let once = inject_manifests(&input, None, &ClusterFacts::default()).unwrap();
    let twice = inject_manifests(&once, None, &ClusterFacts::default()).unwrap();
    assert_eq!(once, twice);
}

#[test]
fn bad_yaml_names_the_document() {
    let input = format!("{NODE}---\nkind: Pod\nmetadata: [unclosed\n");
    let err = inject_manifests(&input, None, &ClusterFacts::default()).unwrap_err();
    assert!(matches!(err, ManifestError::Yaml { doc: 2, .. }), "{err}");
    assert!(err.to_string().starts_with("input document 2: invalid YAML"), "{err}");
}

#[test]
fn invalid_node_names_document_and_field() {
    let bad_type = NODE.replace("hostname: web", "hostname: web\n  ephemeral: sometimes");
    let err = inject_manifests(&bad_type, None, &ClusterFacts::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("document 1") && err.contains("field spec.ephemeral"),
        "{err}"
    );

    let bad_rule = NODE.replace("tag:k8s", "k8s");
    let err = inject_manifests(&bad_rule, None, &ClusterFacts::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("invalid TailscaleNode web") && err.contains("spec.tags"),
        "{err}"
    );
    assert!(err.contains("every tag must look like 'tag:<name>'"), "{err}");
}

#[test]
fn invalid_pod_template_names_the_field() {
    let input = template("Deployment", "apps/v1", true).replace("image: nginx", "image: nginx, ports: 80");
    let err = inject_manifests(&input, Some(NODE), &ClusterFacts::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("document 1 (Deployment w)") && err.contains("spec.containers[0].ports"),
        "{err}"
    );
}

#[test]
fn a_missing_node_is_reported() {
    let err = inject_manifests(&template("Pod", "v1", true), None, &ClusterFacts::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tailnode.dev/node=web") && err.contains("--node FILE"),
        "{err}"
    );
}
