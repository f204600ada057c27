//! The README's metric table (`### Metrics`) against the code and the running processes:
//! every row is exported by the process(es) its `process` column names, with the type and
//! label names the row gives, and a HELP line; every `gateway_*` metric a process exports is
//! a row for that process; and every metric name the `telemetry` modules define is a row, so
//! the table cannot fall behind the code.
//!
//! The processes are the real ones (`gateway node`, `gateway proxy`, `gateway ca serve`),
//! started by the harness in explicit mode (no root needed: the CA service runs without the
//! kernel part), with one real session through the node before the scrape so that the
//! histograms have samples.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use gateway::harness::{CA_SERVER_NAME, DEMO_TRUST_DOMAIN, NODE_NAME, Stack};
use gateway::pki::{self, CertificateAuthority, LeafSpec};

/// The README, read when the test is built (a changed README rebuilds the test).
const README: &str = include_str!("../../README.md");

/// The header row that marks the table.
const HEADER: [&str; 5] = ["metric", "type", "labels", "process", "meaning"];

/// The processes a row may name.
const PROCESSES: [&str; 3] = ["node", "proxy", "ca"];

/// One row of the README's metric table.
#[derive(Debug)]
struct Row {
    name: String,
    kind: String,
    labels: BTreeSet<String>,
    processes: BTreeSet<String>,
}

/// The cells of a Markdown table line (`| a | b |` → `["a", "b"]`), `None` if not a table line.
fn cells(line: &str) -> Option<Vec<String>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(|c| c.trim().to_owned()).collect())
}

/// The backticked words of a cell, or the cell's comma-separated words without backticks.
fn words(cell: &str) -> BTreeSet<String> {
    cell.split(',')
        .map(|w| w.trim().trim_matches('`').trim())
        .filter(|w| !w.is_empty() && *w != "—" && *w != "-")
        .map(str::to_owned)
        .collect()
}

/// The rows of the README's metric table, found by its header row.
fn readme_table(readme: &str) -> Vec<Row> {
    let mut lines = readme.lines();
    lines
        .by_ref()
        .find(|l| cells(l).is_some_and(|c| c == HEADER))
        .unwrap_or_else(|| panic!("README.md has no table with the header {HEADER:?}"));
    let separator = lines.next().and_then(cells).expect("a separator row");
    assert!(
        separator
            .iter()
            .all(|c| c.chars().all(|ch| ch == '-' || ch == ':')),
        "the metric table's second line is not a separator: {separator:?}"
    );
    let mut rows = Vec::new();
    for line in lines {
        let Some(c) = cells(line) else { break };
        assert_eq!(c.len(), HEADER.len(), "metric table row {line:?}");
        let name = c[0].trim_matches('`').to_owned();
        assert!(
            name.starts_with("gateway_") && !name.contains(char::is_whitespace),
            "metric table row {line:?}: the first cell must be one metric name"
        );
        let processes = words(&c[3]);
        assert!(
            !processes.is_empty() && processes.iter().all(|p| PROCESSES.contains(&p.as_str())),
            "metric table row {line:?}: the process column must name some of {PROCESSES:?}"
        );
        assert!(
            !c[4].is_empty(),
            "metric table row {line:?}: no meaning given"
        );
        rows.push(Row {
            name,
            kind: c[1].trim_matches('`').to_owned(),
            labels: words(&c[2]),
            processes,
        });
    }
    assert!(!rows.is_empty(), "the README's metric table has no rows");
    let mut seen = BTreeSet::new();
    for r in &rows {
        assert!(seen.insert(&r.name), "{} has two rows", r.name);
    }
    rows
}

/// What a scrape says about one metric family.
#[derive(Debug, Default)]
struct Family {
    kind: Option<String>,
    help: bool,
    /// Label names of its samples (`le` of histogram buckets left out).
    labels: BTreeSet<String>,
    samples: usize,
}

/// The label names in `{a="x",b="y\"z"}`.
fn label_names(mut s: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    while let Some((name, rest)) = s.split_once("=\"") {
        out.insert(name.trim_start_matches([',', '{']).trim().to_owned());
        // Skip the value, honouring backslash escapes.
        let mut escaped = false;
        let mut end = rest.len();
        for (i, ch) in rest.char_indices() {
            match ch {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        s = &rest[end..];
    }
    out
}

/// A Prometheus text scrape by metric family. A sample `x_bucket`, `x_sum` or `x_count`
/// belongs to `x` when `x` is a histogram or summary.
fn families(scrape: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            out.entry(name.to_owned()).or_default().help = true;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                panic!("bad TYPE line {line:?}");
            };
            out.entry(name.to_owned()).or_default().kind = Some(kind.to_owned());
        }
    }
    for line in scrape.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let sample = &line[..end];
        let labels = match line[end..].strip_prefix('{') {
            Some(rest) => label_names(&rest[..rest.rfind('}').unwrap_or(rest.len())]),
            None => BTreeSet::new(),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| sample.strip_suffix(suffix))
            .find(|base| {
                out.get(*base)
                    .and_then(|f| f.kind.as_deref())
                    .is_some_and(|k| k == "histogram" || k == "summary")
            })
            .unwrap_or(sample)
            .to_owned();
        let f = out.entry(family).or_default();
        f.samples += 1;
        f.labels
            .extend(labels.into_iter().filter(|l| l != "le" && l != "quantile"));
    }
    out
}

/// The address after `ADMIN ` in a process's log.
fn admin_address(log: &str) -> SocketAddr {
    log.lines()
        .find_map(|l| l.strip_prefix("ADMIN "))
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ADMIN line in the log:\n{log}"))
}

/// Starts `gateway ca serve` next to an explicit-mode stack (no kernel part: the CA only
/// needs its server certificate and a pod inventory) and returns its admin address and
/// the UID of the one pod its inventory lists.
fn start_ca(s: &mut Stack) -> (SocketAddr, String) {
    let ca = workload_ca(s);
    let day = Duration::from_secs(24 * 3600);
    let (cert, key) = ca
        .issue(&LeafSpec::server(vec![CA_SERVER_NAME.into()], vec![]), day)
        .unwrap();
    pki::write_public(&s.dir.join("ca-server.crt"), &cert).unwrap();
    pki::write_secret(&s.dir.join("ca-server.key"), &key).unwrap();
    let uid = "5f0c3a1e-2b4d-4c6e-8f10-213243546576";
    std::fs::write(
        s.dir.join(gateway::harness::spec::INVENTORY),
        format!(
            "pods:\n  - {{ uid: {uid}, namespace: team-a, name: api-0, service_account: api, node: {NODE_NAME} }}\n"
        ),
    )
    .unwrap();
    s.start_ca().expect("start gateway ca serve");
    (admin_address(&s.log("ca")), uid.to_owned())
}

fn workload_ca(s: &Stack) -> CertificateAuthority {
    CertificateAuthority::load(
        &s.ca_dir.join(pki::WORKLOAD_CA_CERT),
        &s.ca_dir.join(pki::WORKLOAD_CA_KEY),
    )
    .unwrap()
}

/// Asks the CA for the pod's certificate as its node, as the node agent does.
async fn request_certificate(s: &Stack, pod_uid: &str) {
    use rustls_pki_types::pem::PemObject;
    let (cert, key) = workload_ca(s)
        .issue(
            &LeafSpec::node(DEMO_TRUST_DOMAIN, NODE_NAME),
            Duration::from_secs(600),
        )
        .unwrap();
    let chain = vec![rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let roots = pki::load_certs(&s.ca_dir.join(pki::WORKLOAD_CA_CERT)).unwrap();
    let client = gateway::ca::client::CaClient {
        addr: s.ca_addr.to_string(),
        server_name: rustls_pki_types::ServerName::try_from(CA_SERVER_NAME).unwrap(),
        tls: std::sync::Arc::new(gateway::tunnel::client_config(chain, key, &roots).unwrap()),
    };
    let issued = client
        .workload_certificate(Some(pod_uid))
        .await
        .expect("the CA issues the pod's certificate");
    assert_eq!(
        issued.spiffe_id.to_string(),
        format!("spiffe://{DEMO_TRUST_DOMAIN}/ns/team-a/sa/api")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_readme_metric_is_scraped_from_its_process_and_every_scraped_metric_has_help() {
    let rows = readme_table(README);
    // One more listener, with client TLS (issue 20): its handshake metrics get a sample.
    let mut spec = spec();
    spec.workloads.push(gateway::harness::Workload {
        client_tls: true,
        ..gateway::harness::Workload::new("team-a", "api")
    });
    let tls_listener = spec.workloads.len() - 1;
    let mut s = Stack::start(spec).expect("start the local gateway stack");
    let (ca_admin, pod_uid) = start_ca(&mut s);
    let a = s.listeners[tls_listener];
    let o = std::process::Command::new("psql")
        .arg(format!(
            "host={} port={} user=api dbname=app sslmode=verify-full sslrootcert={}",
            a.ip(),
            a.port(),
            s.trust_bundle.display()
        ))
        .args([
            "-XAtc",
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // One real session through the node (tunnel dial, TLS handshake, upstream login,
    // bytes both ways), and one certificate from the CA.
    let c = connect(&s, TEAM_A_API, "api", "app").await.unwrap();
    let row = c.query_one("select current_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "api");
    request_certificate(&s, &pod_uid).await;

    let scrapes: BTreeMap<&str, String> = [
        ("node", scrape(s.node_admin)),
        ("proxy", scrape(s.proxy_admin)),
        ("ca", scrape(ca_admin)),
    ]
    .into_iter()
    .collect();
    drop(c);

    let mut failures = Vec::new();
    for (process, text) in &scrapes {
        let fams = families(text);
        // The README's rows for this process are exported, as the row says.
        for r in rows.iter().filter(|r| r.processes.contains(*process)) {
            let Some(f) = fams.get(&r.name).filter(|f| f.samples > 0) else {
                failures.push(format!(
                    "README row {}: no sample in the {process}'s /metrics",
                    r.name
                ));
                continue;
            };
            if f.kind.as_deref() != Some(r.kind.as_str()) {
                failures.push(format!(
                    "README row {}: type {:?}, the {process} exports {:?}",
                    r.name, r.kind, f.kind
                ));
            }
            if f.labels != r.labels {
                failures.push(format!(
                    "README row {}: labels {:?}, the {process} exports {:?}",
                    r.name, r.labels, f.labels
                ));
            }
        }
        // Every gateway metric the process exports has HELP and is a README row for it.
        for (name, f) in fams.iter().filter(|(n, _)| n.starts_with("gateway_")) {
            if !f.help {
                failures.push(format!(
                    "{name}: no # HELP line in the {process}'s /metrics"
                ));
            }
            if !rows
                .iter()
                .any(|r| &r.name == name && r.processes.contains(*process))
            {
                failures.push(format!(
                    "{name}: exported by the {process} but not in the README's table for it"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "the README's metric table and the scrapes disagree:\n  {}\n\nscrapes:\n{}",
        failures.join("\n  "),
        scrapes
            .iter()
            .map(|(p, t)| format!("--- {p}\n{t}"))
            .collect::<String>()
    );
    // The scrapes are of the processes that did the work.
    assert!(metric(&scrapes["node"], "gateway_node_connections_total").unwrap() >= 1.0);
    assert!(metric(&scrapes["proxy"], "gateway_proxy_connections_total").unwrap() >= 1.0);
    assert_eq!(
        metric(&scrapes["ca"], "gateway_ca_certificates_issued_total"),
        Some(1.0)
    );
}

/// The string literals starting with `gateway_` in the code of a telemetry module (its
/// `#[cfg(test)]` part left out).
fn names_in_source(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    code.split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("gateway_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_metric_name_the_telemetry_modules_define_is_in_the_readme_table() {
    let table: BTreeSet<String> = readme_table(README).into_iter().map(|r| r.name).collect();

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/telemetry");
    let mut defined = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            defined.extend(names_in_source(&path));
        }
    }
    // Every name the modules define is in one of their `METRICS` lists (so it gets its
    // HELP text), and the README gives each its kind.
    use gateway::telemetry::{Kind, ca, identity, node, proxy};
    let listed = [
        node::METRICS,
        proxy::METRICS,
        ca::METRICS,
        identity::METRICS,
    ]
    .concat();
    let listed_names: BTreeSet<String> = listed.iter().map(|m| m.name.to_owned()).collect();
    assert_eq!(
        listed_names, defined,
        "metric names in gateway/src/telemetry that no METRICS list describes (or the reverse)"
    );
    let kinds: BTreeMap<String, String> = readme_table(README)
        .into_iter()
        .map(|r| (r.name, r.kind))
        .collect();
    for m in &listed {
        let kind = match m.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        if let Some(row) = kinds.get(m.name) {
            assert_eq!(row, kind, "README.md's type for {}", m.name);
        }
    }

    let missing: Vec<_> = defined.difference(&table).collect();
    let extra: Vec<_> = table.difference(&defined).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "README.md's metric table and gateway/src/telemetry disagree:\n  defined in the code, no row: {missing:?}\n  a row, not defined in the code: {extra:?}"
    );
}
