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
    // Waits for a reload with `result` after `before` of them, then one more check interval
    // so that files written one after the other are all in.
    let wait = |r: &'static str, before: f64| {
        let tls_reloads = &tls_reloads;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while tls_reloads(r) <= before {
                assert!(Instant::now() < deadline, "no {r} TLS reload counted");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
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
