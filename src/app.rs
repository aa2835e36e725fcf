//! Wires the subcommands to the library. The only place that touches stdin/stdout and files.

use std::io::{Read, Write};

use anyhow::Context;

use crate::args::{Args, Command, InjectArgs};
use crate::inject::ClusterFacts;
use crate::manifest;

/// Runs the parsed command line.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Crd => {
            let yaml = crate::crd::crd_yaml().context("rendering the CRD")?;
            std::io::stdout().write_all(yaml.as_bytes())?;
            Ok(())
        }
        Command::Inject(a) => inject(a),
    }
}

fn read_input(path: &std::path::Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }
}

fn inject(a: InjectArgs) -> anyhow::Result<()> {
    let input = read_input(&a.file)?;
    let nodes = match &a.node {
        Some(p) => Some(read_input(p)?),
        None => None,
    };
    let facts = ClusterFacts {
        native_sidecars: !a.no_native_sidecars,
        pod_security: a.pod_security.into(),
        defaults: a.defaults.to_defaults(),
        ..ClusterFacts::default()
    };
    let out = manifest::inject_manifests(&input, nodes.as_deref(), &facts)?;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(())
}
