//! Issue 19, policy reload: SIGHUP (or a changed file) swaps the policy for new sessions;
//! a broken file is refused with its line and reason and the old policy keeps serving;
//! open sessions keep the decision they were admitted with.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn hup(s: &gateway::harness::Stack) {
    let pid = s.proxy.as_ref().expect("proxy runs").id() as i32;
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
}

fn reloads(s: &gateway::harness::Stack, result: &str) -> f64 {
    result_count(s.proxy_admin, "gateway_proxy_config_reloads_total", result)
}

/// Waits (10 s at most) until `admin`'s counter `name` with `result` is above `before`.
async fn wait_count(admin: std::net::SocketAddr, name: &str, result: &str, before: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while result_count(admin, name, result) <= before {
        assert!(Instant::now() < deadline, "no {result} counted in {name}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_reloads(s: &gateway::harness::Stack, result: &str, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads(s, result) < n {
        assert!(Instant::now() < deadline, "no {result} reload counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reloads_on_sighup_and_a_broken_file_keeps_the_last_good_one() {
    let s = stack();
    let original = std::fs::read_to_string(&s.proxy_config).unwrap();
    let hash_before = scrape(s.proxy_admin)
        .lines()
        .find(|l| l.starts_with("gateway_proxy_config_info{") && l.ends_with(" 1"))
        .expect("the loaded file's hash is exported")
        .to_owned();
    assert_eq!(
        sqlstate(&connect(&s, INTRUDER, "x", "app").await.unwrap_err()),
        "28000"
    );
    // A session of team-a stays open across a reload that removes team-a's role.
    let open = connect(&s, TEAM_A_API, "api", "app").await.unwrap();

    // Allow the intruder as api; drop team-a's role.
    let mut cfg: serde_norway::Value = serde_norway::from_str(&original).unwrap();
    let roles = cfg.get_mut("roles").unwrap().as_sequence_mut().unwrap();
    roles.retain(|r| r["name"].as_str() != Some("team-a"));
    roles.push(
        serde_norway::from_str(
            "{name: intruder-ok, match: {namespace: intruder}, databases: {names: [main]}, db_users: [api], db_names: [app]}",
        )
        .unwrap(),
    );
    std::fs::write(&s.proxy_config, serde_norway::to_string(&cfg).unwrap()).unwrap();
    hup(&s);
    wait_reloads(&s, "success", 1.0).await;
    let c = connect(&s, INTRUDER, "api", "app")
        .await
        .expect("allowed after reload");
    let row = c.query_one("SELECT current_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "api");
    assert_eq!(
        sqlstate(&connect(&s, TEAM_A_API, "api", "app").await.unwrap_err()),
        "28000"
    );
    open.simple_query("SELECT 1")
        .await
        .expect("the open session keeps its decision");
    let hash_after = scrape(s.proxy_admin);
    assert!(
        hash_after.contains(&hash_before.replace(" 1", " 0")),
        "{hash_after}"
    );

    // A broken file: refused with its line and reason; the last good policy serves on.
    let broken = format!(
        "{}\nroles_typo: []\n",
        serde_norway::to_string(&cfg).unwrap()
    );
    let line = broken.lines().count();
    std::fs::write(&s.proxy_config, &broken).unwrap();
    hup(&s);
    wait_reloads(&s, "error", 1.0).await;
    let log = s.log("proxy");
    let want = format!(
        "{}:{line}:1: unknown field `roles_typo`",
        s.proxy_config.display()
    );
    assert!(log.contains(&want), "no {want:?} in the proxy log:\n{log}");
    assert!(
        connect(&s, INTRUDER, "api", "app").await.is_ok(),
        "the last good policy stays"
    );
    assert_eq!(reloads(&s, "success"), 1.0);

    // A change of databases is refused: upstream settings need a restart.
    let mut moved = cfg.clone();
    moved["databases"][0]["upstream"]["address"] = "127.0.0.1:1".into();
    std::fs::write(&s.proxy_config, serde_norway::to_string(&moved).unwrap()).unwrap();
    hup(&s);
    wait_reloads(&s, "error", 2.0).await;
    assert!(
        s.log("proxy")
            .contains("databases changed; upstream settings are applied by a restart")
    );

    // Without a signal: a changed file is picked up by the watch.
    std::fs::write(&s.proxy_config, &original).unwrap();
    wait_reloads(&s, "success", 2.0).await;
    assert_eq!(
        sqlstate(&connect(&s, INTRUDER, "api", "app").await.unwrap_err()),
        "28000"
    );
}

/// The proxy's TLS files reload without a restart: a renewed server certificate is taken;
/// a key that does not load is refused and counted while the last good set serves on; a
/// database-client CA the server does not trust makes new logins fail while an open
/// session goes on, and the trusted one back makes them work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_files_reload_without_a_restart_and_sessions_keep_theirs() {
    use gateway::pki::{self, CertificateAuthority, LeafSpec};
    let s = stack();
    let tls_reloads = |r: &str| result_count(s.proxy_admin, "gateway_proxy_tls_reloads_total", r);
    // Waits for a reload with `result` after `before` of them.
    let admin = s.proxy_admin;
    let wait = |r: &'static str, before: f64| async move {
        wait_count(admin, "gateway_proxy_tls_reloads_total", r, before).await;
        // One more check interval, so that files written one after the other are all in.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    };
    let open = connect(&s, TEAM_A_API, "api", "app").await.unwrap();

    // A renewed server certificate (and its new key).
    let workload_ca = CertificateAuthority::load(
        &s.ca_dir.join(pki::WORKLOAD_CA_CERT),
        &s.ca_dir.join(pki::WORKLOAD_CA_KEY),
    )
    .unwrap();
    let (cert, key) = workload_ca
        .issue(
            &LeafSpec::server(vec![gateway::harness::PROXY_SERVER_NAME.into()], vec![]),
            Duration::from_secs(3600),
        )
        .unwrap();
    let before = tls_reloads("success");
    std::fs::write(s.dir.join("proxy.key"), &key).unwrap();
    std::fs::write(s.dir.join("proxy.crt"), &cert).unwrap();
    wait("success", before).await;
    connect(&s, TEAM_A_API, "api", "app")
        .await
        .expect("a session after the new certificate");

    // A key that is not one: refused, counted, the last good set serves on.
    let errors = tls_reloads("error");
    std::fs::write(s.dir.join("proxy.key"), "not a key\n").unwrap();
    wait("error", errors).await;
    connect(&s, TEAM_A_API, "api", "app")
        .await
        .expect("a session on the last good set");
    let before = tls_reloads("success");
    std::fs::write(s.dir.join("proxy.key"), &key).unwrap();
    wait("success", before).await;

    // A database-client CA PostgreSQL does not trust: new logins fail, the open session
    // goes on; the trusted CA back, logins work again.
    let files = [pki::DB_CLIENT_CA_CERT, pki::DB_CLIENT_CA_KEY];
    let trusted: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(s.ca_dir.join(f)).unwrap())
        .collect();
    let other = s.dir.join("other-ca");
    pki::init_ca(&other, "elsewhere").unwrap();
    let before = tls_reloads("success");
    for f in files {
        std::fs::copy(other.join(f), s.ca_dir.join(f)).unwrap();
    }
    wait("success", before).await;
    let e = connect(&s, TEAM_A_API, "api", "app").await.unwrap_err();
    assert!(e.as_db_error().is_some(), "{e}");
    open.simple_query("SELECT 1")
        .await
        .expect("the open session keeps its login");
    let before = tls_reloads("success");
    for (f, pem) in files.iter().zip(&trusted) {
        std::fs::write(s.ca_dir.join(f), pem).unwrap();
    }
    wait("success", before).await;
    connect(&s, TEAM_A_API, "api", "app")
        .await
        .expect("logins with the trusted CA again");
}

/// Issue 21: an explicit listener's workload certificate (a file, rotated by hand or by a
/// Secret update) reloads without a restart: a short-lived replacement is taken (new
/// sessions fail once it has ended, which the day-long original would not), and a fresh
/// one brings them back, while the open session keeps its own; a key that is not the
/// certificate's is refused and counted, and the last good pair serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_listener_takes_a_new_workload_certificate_without_a_restart() {
    use gateway::harness::DEMO_TRUST_DOMAIN;
    use gateway::pki::{self, CertificateAuthority, LeafSpec, SpiffeId};
    let s = stack();
    let node_reloads = |r: &str| result_count(s.node_admin, "gateway_node_tls_reloads_total", r);
    let admin = s.node_admin;
    let wait = |r: &'static str, before: f64| {
        wait_count(admin, "gateway_node_tls_reloads_total", r, before)
    };
    let open = connect(&s, TEAM_A_API, "api", "app").await.unwrap();
    let ca = CertificateAuthority::load(
        &s.ca_dir.join(pki::WORKLOAD_CA_CERT),
        &s.ca_dir.join(pki::WORKLOAD_CA_KEY),
    )
    .unwrap();
    let api = SpiffeId::new(DEMO_TRUST_DOMAIN, "team-a", "api");
    let (cert_path, key_path) = (s.dir.join("workload-0.crt"), s.dir.join("workload-0.key"));
    let replace = |ttl: Duration| {
        let (cert, key) = ca.issue(&LeafSpec::workload(&api), ttl).unwrap();
        pki::write_public(&cert_path, &cert).unwrap();
        pki::write_secret(&key_path, &key).unwrap();
    };

    // A certificate that ends in a few seconds replaces the day-long one.
    let before = node_reloads("success");
    let short = Duration::from_secs(6);
    let written = Instant::now();
    replace(short);
    wait("success", before).await;
    assert!(written.elapsed() < short, "reloaded before it ended");
    connect(&s, TEAM_A_API, "api", "app")
        .await
        .expect("a session with the new certificate");
    tokio::time::sleep((short + Duration::from_secs(2)).saturating_sub(written.elapsed())).await;
    // Refused by the proxy: in a new handshake (TLS alert), or at the session's start on a
    // warm tunnel made while the certificate was valid (a credential is checked on every
    // use; before that check this session got through).
    let e = connect(&s, TEAM_A_API, "api", "app")
        .await
        .expect_err("the listener tunnels with the new, now ended, certificate");
    let e = format!("{e:?}");
    assert!(
        e.contains("CertificateExpired") || e.contains("is not valid now"),
        "{e}"
    );

    // A fresh one: sessions again; the open session never noticed.
    let before = node_reloads("success");
    replace(Duration::from_secs(3600));
    wait("success", before).await;
    connect(&s, TEAM_A_API, "api", "app")
        .await
        .expect("a session with the fresh certificate");
    let user: String = open
        .query_one("select current_user::text", &[])
        .await
        .expect("the open session keeps its tunnel")
        .get(0);
    assert_eq!(user, "api");

    // Another key beside the certificate: refused, the last good pair serves on.
    let errors = node_reloads("error");
    let (_, other_key) = ca
        .issue(&LeafSpec::workload(&api), Duration::from_secs(3600))
        .unwrap();
    pki::write_secret(&key_path, &other_key).unwrap();
    wait("error", errors).await;
    connect(&s, TEAM_A_API, "api", "app")
        .await
        .expect("a session on the last good pair");
    assert!(
        s.log("node")
            .contains("listener workload certificate changed but did not load"),
        "{}",
        s.log("node")
    );
}
