//! Privileged end to end: pods in their own network namespaces and kubelet-shaped cgroups
//! dial the database's ordinary address on 5432; eBPF redirects them to the node agent,
//! which learns the pod from the socket's cgroup, gets the pod's certificate from the CA
//! service and tunnels to the proxy. Needs root (CI runs as root); with `CI=true` it fails
//! rather than skips when it cannot run.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use gateway::config::{DatabaseSelector, MatchConfig, RoleConfig};
use gateway::harness::{PodSpec, Stack, TransparentSpec, strings};

const API: usize = 0; // team-a/api
const REPORTER: usize = 1; // team-a/reporter
const WORKER: usize = 2; // team-b/worker
const HOSTNET: usize = 3; // team-b/worker, host network
const DENIED: usize = 4; // intruder/x
const UNLISTED: usize = 5; // a pod the inventory does not know

fn privileged() -> bool {
    gateway::harness::root_or_skip("the transparent end-to-end tests (CAP_BPF, CAP_NET_ADMIN)")
}

fn transparent_stack() -> Stack {
    let mut spec = spec();
    spec.workloads.clear();
    // Keep the extra "down" database: team-b's role names it.
    spec.roles.push(RoleConfig {
        name: "reporters".into(),
        matcher: MatchConfig {
            spiffe_id: Some("spiffe://demo.db-gateway.local/ns/team-a/sa/reporter".into()),
            ..MatchConfig::default()
        },
        databases: DatabaseSelector {
            names: strings(&["main"]),
            ..DatabaseSelector::default()
        },
        db_users: strings(&["reporter"]),
        db_names: strings(&["app"]),
        ..RoleConfig::default()
    });
    spec.setup_sql.push("CREATE ROLE reporter LOGIN".into());
    let mut hostnet = PodSpec::new("team-b", "worker-host", "worker");
    hostnet.host_network = true;
    spec.transparent = Some(TransparentSpec {
        pods: vec![
            PodSpec::new("team-a", "api-0", "api"),
            PodSpec::new("team-a", "reporter-0", "reporter"),
            PodSpec::new("team-b", "worker-0", "worker"),
            hostnet,
            PodSpec::new("intruder", "x-0", "x"),
            PodSpec {
                unlisted: true,
                ..PodSpec::new("team-a", "new-0", "api")
            },
        ],
        host_identity: None,
        ipv6: true,
        join: false,
        ..TransparentSpec::default()
    });
    Stack::start(spec).expect("transparent stack")
}

fn conn(s: &Stack, port: u16, user: &str) -> String {
    let k = s.kernel.as_ref().unwrap();
    format!(
        "host={} port={port} user={user} dbname=app sslmode=disable connect_timeout=5",
        k.db_addr.ip()
    )
}

fn psql_in(s: &Stack, pod: usize, conninfo: &str, sql: &str) -> Output {
    s.kernel.as_ref().unwrap().pods[pod]
        .command("psql")
        .arg(conninfo)
        .args(["-XAtc", sql])
        .output()
        .unwrap()
}

/// Runs this test binary inside a pod as a tokio-postgres client (see `pod_client`).
fn tokio_postgres_in(s: &Stack, pod: usize, conninfo: &str) -> Output {
    s.kernel.as_ref().unwrap().pods[pod]
        .command(std::env::current_exe().unwrap().to_str().unwrap())
        .args(["--exact", "pod_client", "--nocapture", "--test-threads=1"])
        .env("DBGW_POD_CLIENT", conninfo)
        .output()
        .unwrap()
}

/// Not a test of its own: the tokio-postgres client that [`tokio_postgres_in`] starts
/// inside a pod. Without `DBGW_POD_CLIENT` it does nothing.
#[test]
fn pod_client() {
    let Ok(conninfo) = std::env::var("DBGW_POD_CLIENT") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let row = client
            .query_one("select current_user::text", &[])
            .await
            .unwrap();
        println!("POD-CLIENT-USER {}", row.get::<_, String>(0));
    });
}

#[test]
fn pods_get_their_policy_users_through_interception() {
    if !privileged() {
        return;
    }
    let s = transparent_stack();
    let port = 5432;
    for (pod, user, want) in [
        (API, "api", "api"),
        (REPORTER, "reporter", "reporter"),
        (WORKER, "postgres", "worker"), // forced by policy
        (HOSTNET, "whatever", "worker"),
    ] {
        let got = stdout(&psql_in(
            &s,
            pod,
            &conn(&s, port, user),
            "select current_user",
        ));
        assert_eq!(got, want, "psql in pod {pod}");
        let o = tokio_postgres_in(&s, pod, &conn(&s, port, user));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains(&format!("POD-CLIENT-USER {want}")),
            "tokio-postgres in pod {pod}: {text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // IPv6: the same pod dialling the database's IPv6 address is intercepted too.
    let db6 = s.kernel.as_ref().unwrap().db_addr_v6.unwrap();
    let c6 = format!(
        "host={} port=5432 user=api dbname=app sslmode=disable connect_timeout=5",
        db6.ip()
    );
    assert_eq!(
        stdout(&psql_in(&s, API, &c6, "select current_user")),
        "api",
        "IPv6"
    );

    // The denied pod gets the ErrorResponse with its identity.
    let o = psql_in(&s, DENIED, &conn(&s, port, "x"), "select 1");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("identity spiffe://demo.db-gateway.local/ns/intruder/sa/x is not allowed to use database \"main\""), "{err}");

    // A pod the resolver does not know: the agent waits briefly (unknown_pod_wait: 1s),
    // then says why.
    let t0 = std::time::Instant::now();
    let o = psql_in(&s, UNLISTED, &conn(&s, port, "api"), "select 1");
    let err = String::from_utf8_lossy(&o.stderr);
    let uid = &s.kernel.as_ref().unwrap().pods[UNLISTED].uid;
    assert!(
        err.contains("cannot identify the workload") && err.contains(uid.as_str()),
        "{err}"
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "did not wait for the pod"
    );

    // A user the identity may not use.
    let o = psql_in(&s, API, &conn(&s, port, "postgres"), "select 1");
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("may not log in to \"main\" as database user \"postgres\"")
    );

    // A process outside any pod, with no host identity configured: refused, saying why.
    let k = s.kernel.as_ref().unwrap();
    let o = k
        .outside_command("psql")
        .arg(conn(&s, port, "api"))
        .args(["-XAtc", "select 1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("cannot identify the workload"), "{err}");

    // Port 5433 is not intercepted: the connection goes to the bridge address, where
    // nothing listens.
    let o = psql_in(&s, API, &conn(&s, 5433, "api"), "select 1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Connection refused"), "{err}");

    // getpeername in the pod returns the address the application dialled.
    let k = s.kernel.as_ref().unwrap();
    let o = k.pods[API]
        .command("python3")
        .args([
            "-c",
            &format!(
                "import socket; s = socket.create_connection(('{}', 5432)); print('%s:%d' % s.getpeername())",
                k.db_addr.ip()
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(stdout(&o), k.db_addr.to_string());

    // Audit names pod, namespace, container and node.
    std::thread::sleep(Duration::from_millis(300));
    let events = s.audit_events();
    let api = events
        .iter()
        .find(|e| e["event"] == "db.session.start" && e["db_user"] == "api")
        .expect("api session audited");
    assert_eq!(
        api["identity"],
        "spiffe://demo.db-gateway.local/ns/team-a/sa/api"
    );
    assert_eq!(api["node"], "demo-node");
    assert_eq!(api["pod"]["namespace"], "team-a");
    assert_eq!(api["pod"]["name"], "api-0");
    assert_eq!(api["pod"]["uid"], k.pods[API].uid.as_str());
    assert_eq!(
        api["pod"]["container_id"],
        k.pods[API].container_id.as_str()
    );
}

#[test]
fn interception_survives_sigkill_and_uninstall_removes_everything() {
    if !privileged() {
        return;
    }
    let mut s = transparent_stack();
    let c = conn(&s, 5432, "api");
    assert_eq!(stdout(&psql_in(&s, API, &c, "select current_user")), "api");
    s.kill_node();
    let pin_dir = s.kernel.as_ref().unwrap().pin_dir.clone();
    assert!(
        pin_dir.join("links").exists() || std::fs::read_dir(&pin_dir).unwrap().count() > 0,
        "pins survive SIGKILL"
    );
    s.start_node().expect("restart adopts the pins");
    assert!(s.log("node").contains("adopted=true"), "{}", s.log("node"));
    assert_eq!(stdout(&psql_in(&s, API, &c, "select current_user")), "api");

    s.kill_node();
    let ifname = s.kernel.as_ref().unwrap().agent_interface.clone();
    assert!(
        Command::new("ip")
            .args(["link", "show", &ifname])
            .output()
            .unwrap()
            .status
            .success(),
        "the agent made {ifname}"
    );
    let o = Command::new(gateway_bin())
        .args([
            "node",
            "uninstall",
            "--pin-dir",
            pin_dir.to_str().unwrap(),
            "--interface",
            &ifname,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!pin_dir.exists(), "pin dir left behind");
    assert!(
        !Command::new("ip")
            .args(["link", "show", &ifname])
            .output()
            .unwrap()
            .status
            .success(),
        "{ifname} left behind"
    );
    // Nothing is attached any more: the pod's connect goes to the bridge address itself.
    let o = psql_in(&s, API, &c, "select 1");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Connection refused"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_refuses_a_node_asking_for_a_pod_on_another_node() {
    if !privileged() {
        return;
    }
    let s = transparent_stack();
    let k = s.kernel.as_ref().unwrap();
    let ca_dir = s.ca_dir.clone();
    let ca = gateway::pki::CertificateAuthority::load(
        &ca_dir.join(gateway::pki::WORKLOAD_CA_CERT),
        &ca_dir.join(gateway::pki::WORKLOAD_CA_KEY),
    )
    .unwrap();
    let roots = gateway::pki::load_certs(&ca_dir.join(gateway::pki::WORKLOAD_CA_CERT)).unwrap();
    let client_for = |node: &str| {
        let (c, key) = ca
            .issue(
                &gateway::pki::LeafSpec::node(gateway::harness::DEMO_TRUST_DOMAIN, node),
                Duration::from_secs(600),
            )
            .unwrap();
        use rustls_pki_types::pem::PemObject;
        let chain = vec![rustls_pki_types::CertificateDer::from_pem_slice(c.as_bytes()).unwrap()];
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        gateway::ca::client::CaClient {
            addr: s.ca_addr.to_string(),
            server_name: rustls_pki_types::ServerName::try_from(gateway::harness::CA_SERVER_NAME)
                .unwrap(),
            tls: std::sync::Arc::new(gateway::tunnel::client_config(chain, key, &roots).unwrap()),
        }
    };
    let uid = k.pods[API].uid.clone();
    // The pod's own node gets its identity...
    let ok = client_for(gateway::harness::NODE_NAME)
        .workload_certificate(Some(&uid))
        .await
        .unwrap();
    assert_eq!(
        ok.spiffe_id.to_string(),
        "spiffe://demo.db-gateway.local/ns/team-a/sa/api"
    );
    // ...another node does not.
    let Err(e) = client_for("other-node")
        .workload_certificate(Some(&uid))
        .await
    else {
        panic!("another node obtained the pod's identity");
    };
    assert_eq!(
        e.to_string(),
        format!("CA refused: pod {uid} runs on node demo-node, not on other-node")
    );
}
