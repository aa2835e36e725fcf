//! `tailnode inject`'s manifest reader with arbitrary text as the YAML stream. A line `#--node`
//! splits the input into the stream and the `--node` stream. Never a panic; an injected stream
//! parses again as YAML.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tailnode::inject::{ClusterFacts, OperatorDefaults, PodSecurityLevel, WorkloadKind};
use tailnode::manifest::inject_manifests;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (input, nodes) = match text.split_once("\n#--node\n") {
        Some((input, nodes)) => (input, Some(nodes)),
        None => (text, None),
    };
    // The cluster facts follow the input's length, so that mutations visit both.
    let (native_sidecars, pod_security) = if data.len() % 2 == 0 {
        (true, PodSecurityLevel::Privileged)
    } else {
        (false, PodSecurityLevel::Restricted)
    };
    let facts = ClusterFacts {
        native_sidecars,
        pod_security,
        workload: WorkloadKind::Other,
        defaults: OperatorDefaults::default(),
        api_server_host: None,
        namespace: None,
    };
    if let Ok(out) = inject_manifests(input, nodes, &facts) {
        for doc in serde_yaml::Deserializer::from_str(&out) {
            use serde::Deserialize;
            assert!(
                serde_yaml::Value::deserialize(doc).is_ok(),
                "the output is not YAML:\n{out}"
            );
        }
    }
});
