//! The Kubernetes manifests under `deploy/` against the binary: every subcommand, flag and
//! `GATEWAY_*` environment variable a container of the gateway image uses is in that
//! subcommand's `--help`; every port a container declares is one its process listens on (from
//! its config file, loaded with the real loaders, or its listen variables); the Services and
//! `node.yaml` agree on the proxy's and the CA's ports; probes use the admin paths; every
//! metric of the dashboard is a row of the README's metric table; and `deploy/Dockerfile`
//! builds what the workspace defines (package `gateway`, `--no-default-features`,
//! `target/release/gateway`). Reads the files as written; `cargo xtask deploy-check` renders
//! them with kustomize and validates the result.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use gateway::config::{NodeConfig, ProxyConfig};
use serde_norway::Value;

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");
/// The image name the manifests use (kustomize's `images:` sets the registry and tag).
const IMAGE: &str = "db-gateway";
const ADMIN_PATHS: [&str; 2] = ["/readyz", "/healthz"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}

/// Every YAML document of every manifest (configs and kustomizations excluded).
fn manifests() -> Vec<(PathBuf, Value)> {
    let mut paths = Vec::new();
    files(&root().join("deploy"), "yaml", &mut paths);
    let mut docs = Vec::new();
    for p in paths {
        if p.components().any(|c| c.as_os_str() == "config")
            || p.file_name().is_some_and(|n| n == "kustomization.yaml")
        {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        for d in serde_norway::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            if !v.is_null() {
                docs.push((p.clone(), v));
            }
        }
    }
    assert!(!docs.is_empty(), "no manifests under deploy/");
    docs
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(v, path)?.as_str()
}

fn seq<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    get(v, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// (manifest, owner name, container) for every container of the gateway image.
fn gateway_containers(docs: &[(PathBuf, Value)]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (path, doc) in docs {
        let Some(spec) = get(doc, &["spec", "template", "spec"]) else {
            continue;
        };
        for list in ["initContainers", "containers"] {
            for c in seq(spec, &[list]) {
                if s(c, &["image"]) == Some(IMAGE) && get(c, &["command"]).is_none() {
                    let name = format!(
                        "{}: {} container {}",
                        path.strip_prefix(root()).unwrap_or(path).display(),
                        s(doc, &["metadata", "name"]).unwrap_or("?"),
                        s(c, &["name"]).unwrap_or("?")
                    );
                    out.push((name, c.clone()));
                }
            }
        }
    }
    assert!(!out.is_empty(), "no container runs the gateway image");
    out
}

fn args(c: &Value) -> Vec<String> {
    seq(c, &["args"])
        .iter()
        .map(|a| a.as_str().expect("args are strings").to_owned())
        .collect()
}

fn env(c: &Value) -> BTreeMap<String, String> {
    seq(c, &["env"])
        .iter()
        .map(|e| {
            (
                s(e, &["name"]).unwrap().to_owned(),
                s(e, &["value"]).unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn help(subcommands: &[String]) -> String {
    let out = Command::new(GATEWAY)
        .args(subcommands)
        .arg("--help")
        .output()
        .expect("run gateway --help");
    assert!(
        out.status.success(),
        "gateway {} --help failed: {}",
        subcommands.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn subcommands_flags_and_env_vars_exist() {
    for (name, c) in gateway_containers(&manifests()) {
        let args = args(&c);
        let words: Vec<String> = args
            .iter()
            .take_while(|a| !a.starts_with('-'))
            .cloned()
            .collect();
        assert!(!words.is_empty(), "{name}: no subcommand in args");
        let help = help(&words);
        assert!(
            // A required subcommand: a usage line ending in `<COMMAND>` and no other usage
            // line (`gateway node` also runs without one).
            help.lines()
                .filter(|l| l.contains("gateway "))
                .any(|l| !l.ends_with("<COMMAND>")),
            "{name}: `gateway {}` is not a complete command",
            words.join(" ")
        );
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            let flag = flag.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "{name}: `gateway {}` has no flag {flag}:\n{help}",
                words.join(" ")
            );
        }
        for var in env(&c).keys().filter(|k| k.starts_with("GATEWAY_")) {
            let global = var == "GATEWAY_LOG";
            assert!(
                global || help.contains(&format!("[env: {var}=")),
                "{name}: `gateway {}` reads no {var}:\n{help}",
                words.join(" ")
            );
        }
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

/// Each config file with what its loader made of it.
type Loaded<T> = Vec<(PathBuf, T)>;

/// The configs under deploy/ (every overlay's copy), loaded with the real loaders.
fn configs() -> (Loaded<NodeConfig>, Loaded<ProxyConfig>) {
    let mut paths = Vec::new();
    files(&root().join("deploy"), "yaml", &mut paths);
    let (mut nodes, mut proxies) = (Vec::new(), Vec::new());
    for p in paths {
        if !p.parent().is_some_and(|d| d.ends_with("config")) {
            continue;
        }
        match p.file_name().and_then(|n| n.to_str()) {
            Some("node.yaml") => nodes.push((p.clone(), NodeConfig::load(&p).unwrap())),
            Some("proxy.yaml") => proxies.push((p.clone(), ProxyConfig::load(&p).unwrap())),
            _ => {}
        }
    }
    assert!(!nodes.is_empty() && !proxies.is_empty(), "configs missing");
    (nodes, proxies)
}

#[test]
fn ports_are_the_ones_the_processes_listen_on() {
    let docs = manifests();
    let (nodes, proxies) = configs();
    for (name, c) in gateway_containers(&docs) {
        let args = args(&c);
        let env = env(&c);
        let mut listening = BTreeSet::new();
        for var in [
            "GATEWAY_LISTEN",
            "GATEWAY_ADMIN_LISTEN",
            "GATEWAY_JOIN_LISTEN",
        ] {
            if let Some(v) = env.get(var) {
                listening.insert(port_of(v));
            }
        }
        if env.contains_key("GATEWAY_CONFIG") {
            match args[0].as_str() {
                "proxy" => {
                    for (_, p) in &proxies {
                        listening.insert(p.listen.port());
                        listening.insert(p.admin_listen.port());
                    }
                }
                "node" if !env.contains_key("GATEWAY_ADMIN_LISTEN") => {
                    for (_, n) in &nodes {
                        listening.insert(n.admin_listen.port());
                    }
                }
                _ => {}
            }
        }
        if args[0] == "ca" && !env.contains_key("GATEWAY_LISTEN") {
            listening.insert(7444);
        }
        for p in seq(&c, &["ports"]) {
            let port = get(p, &["containerPort"]).and_then(Value::as_u64).unwrap() as u16;
            assert!(
                listening.contains(&port),
                "{name}: containerPort {port} is none of the process's ports {listening:?}"
            );
        }
        for probe in ["readinessProbe", "livenessProbe"] {
            if let Some(path) = s(&c, &[probe, "httpGet", "path"]) {
                assert!(ADMIN_PATHS.contains(&path), "{name}: {probe} path {path}");
            }
        }
    }
    // The Services are where node.yaml sends the agent.
    let service = |n: &str| {
        docs.iter()
            .map(|(_, d)| d)
            .find(|d| s(d, &["kind"]) == Some("Service") && s(d, &["metadata", "name"]) == Some(n))
            .unwrap_or_else(|| panic!("no Service {n}"))
            .clone()
    };
    let proxy_svc = service("gateway-proxy");
    let ca_svc = service("gateway-ca");
    let svc_ports = |svc: &Value| -> BTreeSet<u16> {
        seq(svc, &["spec", "ports"])
            .iter()
            .map(|p| get(p, &["port"]).and_then(Value::as_u64).unwrap() as u16)
            .collect()
    };
    for (path, n) in &nodes {
        assert!(
            n.proxy.address.starts_with("gateway-proxy.")
                && svc_ports(&proxy_svc).contains(&port_of(&n.proxy.address)),
            "{}: proxy.address {} is not the gateway-proxy Service",
            path.display(),
            n.proxy.address
        );
        for (_, p) in &proxies {
            assert_eq!(port_of(&n.proxy.address), p.listen.port(), "proxy port");
        }
        // Cancel routing: replica i's own Service selects StatefulSet pod i, and the
        // StatefulSet has exactly as many replicas as the node lists.
        if !n.proxy.replicas.is_empty() {
            let sts = docs
                .iter()
                .map(|(_, d)| d)
                .find(|d| {
                    s(d, &["kind"]) == Some("StatefulSet")
                        && s(d, &["metadata", "name"]) == Some("gateway-proxy")
                })
                .expect("proxy.replicas needs the gateway-proxy StatefulSet");
            assert_eq!(
                get(sts, &["spec", "replicas"]).and_then(Value::as_u64),
                Some(n.proxy.replicas.len() as u64),
                "{}: proxy.replicas and the StatefulSet's replicas differ",
                path.display()
            );
            for (i, r) in n.proxy.replicas.iter().enumerate() {
                let name = format!("gateway-proxy-{i}");
                assert!(
                    r.starts_with(&format!("{name}.")),
                    "{}: proxy.replicas[{i}] {r} is not the Service {name}",
                    path.display()
                );
                let svc = service(&name);
                assert_eq!(
                    s(
                        &svc,
                        &["spec", "selector", "statefulset.kubernetes.io/pod-name"]
                    ),
                    Some(name.as_str()),
                    "Service {name} must select pod {name} alone"
                );
                assert!(svc_ports(&svc).contains(&port_of(r)), "{name}: port of {r}");
            }
        }
        let ca = &n.interception.as_ref().expect("transparent mode").ca;
        let addresses = std::iter::once(("interception.ca.address", ca.address.as_str())).chain(
            ca.join
                .as_ref()
                .map(|j| ("interception.ca.join.address", j.address())),
        );
        for (what, address) in addresses {
            assert!(
                (address.starts_with("gateway-ca.") || address.starts_with("gateway-ca:"))
                    && svc_ports(&ca_svc).contains(&port_of(address)),
                "{}: {what} {address} is not the gateway-ca Service and a port of it",
                path.display()
            );
        }
    }
}

/// The metric names of the README's table.
fn readme_metrics() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `gateway_"))
        .map(|l| format!("gateway_{}", l.split('`').next().unwrap()))
        .collect()
}

#[test]
fn dashboard_metrics_exist() {
    let known = readme_metrics();
    assert!(known.len() > 20, "README metric table not found");
    let mut paths = Vec::new();
    files(&root().join("deploy"), "json", &mut paths);
    let mut used = 0;
    for p in paths {
        let text = std::fs::read_to_string(&p).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("gateway_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|b| known.contains(*b))
                .unwrap_or(&name);
            assert!(
                known.contains(base),
                "{}: metric {name} is not in README's metric table",
                p.display()
            );
            used += 1;
        }
    }
    assert!(used > 0, "no dashboard uses a gateway metric");
}

#[test]
fn dockerfile_builds_the_workspace_binary() {
    let docker = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let build = docker
        .lines()
        .find(|l| l.contains("cargo build"))
        .expect("Dockerfile runs cargo build");
    for part in ["--release", "-p gateway", "--no-default-features"] {
        assert!(
            build.contains(part),
            "Dockerfile's build lacks {part}: {build}"
        );
    }
    assert!(docker.contains("target/release/gateway"));
    let workspace = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(
        workspace.contains("\"gateway\""),
        "workspace member gateway"
    );
    let manifest = std::fs::read_to_string(root().join("gateway/Cargo.toml")).unwrap();
    assert!(manifest.contains("name = \"gateway\"") && !manifest.contains("[[bin]]"));
    // The binary is `gateway` (tests run it as CARGO_BIN_EXE_gateway).
    assert!(
        Path::new(GATEWAY)
            .file_name()
            .is_some_and(|n| n == "gateway")
    );
    // The runtime stage has iproute2: the node agent runs `ip` (node/interface.rs).
    assert!(docker.contains("iproute2"));
}
