//! Node joins through the real binary: `gateway ca token create`, `gateway ca serve
//! --join-listen --join-tokens`, a node that joins with the token (the library's
//! `JoinClient`, as the node agent runs it) and then gets a pod's workload certificate from
//! the same CA with the joined certificate; the token's second use is refused.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{gateway_bin, run_gateway, start_printing_addresses};
use gateway::ca::join::client::{JoinClient, NodeIdentity, Prover, Schedule, client_config};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

#[tokio::test]
async fn a_node_joins_with_a_one_time_token_and_gets_its_pods_certificates() {
    let dir = std::env::temp_dir().join(format!("dbgw-joins-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    run_gateway(&["ca", "init", "--dir", &p("ca"), "--trust-domain", "td"]);
    run_gateway(&[
        "ca",
        "issue-server",
        "--dir",
        &p("ca"),
        "--dns",
        "gateway-ca",
        "--out",
        &p("server"),
    ]);
    std::fs::write(
        p("inventory.yaml"),
        "pods:\n  - {uid: 0f9c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b, namespace: team-a, name: api-0, service_account: api, node: node-1}\n",
    )
    .unwrap();
    let token = run_gateway(&[
        "ca",
        "token",
        "create",
        "--tokens",
        &p("tokens"),
        "--node-name",
        "node-1",
        "--ttl",
        "10m",
        "--one-time",
    ]);
    std::fs::write(p("token"), &token).unwrap();
    assert!(!std::fs::read_dir(p("tokens")).unwrap().any(|e| {
        std::fs::read_to_string(e.unwrap().path())
            .unwrap()
            .contains(token.trim())
    }));

    let mut serve = Command::new(gateway_bin());
    serve.args([
        "ca",
        "serve",
        "--dir",
        &p("ca"),
        "--tls-cert",
        &p("server.crt"),
        "--tls-key",
        &p("server.key"),
        "--inventory",
        &p("inventory.yaml"),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--join-listen",
        "127.0.0.1:0",
        "--join-tokens",
        &p("tokens"),
        "--node-cert-ttl",
        "10m",
    ]);
    let (ca, printed) = start_printing_addresses(serve);
    let (join_addr, listen) = (printed["JOIN"], printed["LISTENING"]);

    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join("ca/workload-ca.crt"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let node = |name: &str| {
        let identity = Arc::new(NodeIdentity::default());
        JoinClient {
            addr: join_addr.to_string(),
            server_name: ServerName::try_from("gateway-ca").unwrap(),
            tls: Arc::new(
                client_config(
                    Arc::new(gateway::tunnel::ReloadableRoots::new(&roots).unwrap()),
                    identity.clone(),
                )
                .unwrap(),
            ),
            identity,
            node_name: name.into(),
            prover: Prover::Token(dir.join("token")),
            timeout: Duration::from_secs(10),
            schedule: Schedule::default(),
        }
    };
    let node1 = node("node-1");
    let joined = node1.join().await.unwrap();
    assert_eq!(
        gateway::pki::node_name_of(&joined.key.cert[0], "td").unwrap(),
        "node-1"
    );

    // The joined certificate gets the node's pod its workload certificate.
    let workload = gateway::ca::client::CaClient {
        addr: listen.to_string(),
        server_name: ServerName::try_from("gateway-ca").unwrap(),
        tls: node1.tls.clone(),
    };
    let issued = workload
        .workload_certificate(Some("0f9c1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"))
        .await
        .unwrap();
    assert_eq!(issued.spiffe_id.to_string(), "spiffe://td/ns/team-a/sa/api");

    // The token was for one join: a second node (no certificate) is refused.
    let e = node("node-1").join().await.unwrap_err().to_string();
    assert_eq!(
        e,
        "the CA refused the join: token join refused: one-time join token already used"
    );
    drop(ca);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The node agent joins by itself — a one-time token and the CA's join listener, no node
/// certificate file in its configuration — then serves a pod: the pod dials the database's
/// ordinary address and its session reaches PostgreSQL as its policy user, on a workload
/// certificate the joined node got from the CA.
#[test]
fn a_joined_node_agent_serves_a_pods_session() {
    use gateway::harness::{PodSpec, Stack, TransparentSpec};
    if !gateway::harness::root_or_skip("a joined node agent with a pod (CAP_BPF, CAP_NET_ADMIN)") {
        return;
    }
    let mut spec = common::spec();
    spec.workloads.clear();
    spec.transparent = Some(TransparentSpec {
        pods: vec![PodSpec::new("team-a", "api-0", "api")],
        host_identity: None,
        ipv6: false,
        join: true,
        ..TransparentSpec::default()
    });
    let s = Stack::start(spec).expect("a stack whose node joins");
    let node_config = std::fs::read_to_string(&s.node_config).unwrap();
    assert!(
        node_config.contains("method: token") && !node_config.contains("node.crt"),
        "{node_config}"
    );
    let k = s.kernel.as_ref().unwrap();
    let out = k.pods[0]
        .command("psql")
        .arg(format!(
            "host={} port=5432 user=api dbname=app sslmode=disable connect_timeout=5",
            k.db_addr.ip()
        ))
        .args(["-XAtc", "select current_user"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\nnode log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.log("node")
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "api");
    let node_log = s.log("node");
    assert!(node_log.contains("joined the CA"), "{node_log}");
    let ca_log = s.log("ca");
    assert!(
        ca_log
            .lines()
            .any(|l| l.contains("node joined") && l.contains("token")),
        "{ca_log}"
    );
}
