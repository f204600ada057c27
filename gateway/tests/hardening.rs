//! Issue 18, hardening: policy, listeners, audit and files (items 4, 5, 11, 12, 13). Each test
//! is named after the item it proves and fails on the code before its fix.

mod common;

use std::process::Command;

use common::*;
use gateway::harness::{Stack, Workload};

/// team-a's identities with a service account named like the superuser (index 4), and a
/// role `secret_reader` that `api` is a member of, which `SET ROLE` would reach.
fn reserved_stack() -> (Stack, usize) {
    let mut spec = spec();
    spec.workloads.push(Workload::new("team-a", "postgres"));
    spec.setup_sql.extend([
        "CREATE ROLE secret_reader NOLOGIN".to_owned(),
        "GRANT secret_reader TO api".to_owned(),
    ]);
    let i = spec.workloads.len() - 1;
    (Stack::start(spec).expect("stack"), i)
}

async fn connect_with(
    s: &Stack,
    i: usize,
    user: &str,
    extra: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conn = format!("{} {extra}", s.conn_string(i, user, "app"));
    let (client, conn) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Item 4: the superuser is never reached through a template, and no startup parameter
/// changes the role the policy chose. Before the fix, team-a/postgres logged in as the
/// superuser and `options=-c role=secret_reader` ran as that role.
#[tokio::test]
async fn hardening_04_reserved_users_and_privileged_startup_parameters_are_refused() {
    let (s, superuser_sa) = reserved_stack();

    let e = connect_with(&s, superuser_sa, "postgres", "")
        .await
        .unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "42501", "{e}");
    assert!(
        db.message().starts_with("db-gateway: identity spiffe://"),
        "{e}"
    );
    assert!(
        db.message().contains("reserved database user \"postgres\""),
        "{e}"
    );
    assert!(db.hint().unwrap().contains("lists them literally"), "{e}");

    for (extra, param) in [
        ("options='-c role=secret_reader'", "role"),
        (
            "options='-csession_authorization=postgres'",
            "session_authorization",
        ),
        ("options='--role=secret_reader'", "role"),
    ] {
        let e = connect_with(&s, TEAM_A_API, "api", extra)
            .await
            .unwrap_err();
        let db = e.as_db_error().unwrap_or_else(|| panic!("{extra}: {e}"));
        assert_eq!(db.code().code(), "42501", "{extra}: {e}");
        assert_eq!(
            db.message(),
            format!(
                "db-gateway: the options parameter \"{param}\" is not allowed through the gateway"
            ),
        );
        assert!(
            db.hint()
                .unwrap()
                .contains("policy chooses the database user")
        );
    }
    // `replication` as a startup parameter (a walsender), sent raw.
    let bytes = gateway::pg::encode_startup(&[
        ("user", "api"),
        ("database", "app"),
        ("replication", "database"),
    ]);
    let e = only_error(&raw_exchange(s.listeners[TEAM_A_API], &bytes));
    assert_eq!(e.sqlstate, "42501", "{e:?}");
    assert!(e.message.contains("\"replication\""), "{e:?}");

    // Unknown settings: a protocol error naming the parameter and how to allow it.
    let e = connect_with(&s, TEAM_A_API, "api", "options='-c log_statement=all'")
        .await
        .unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "08P01", "{e}");
    assert!(
        db.hint().unwrap().contains("upstream.startup_parameters"),
        "{e}"
    );

    // What applications set still works, and the session is the policy's user.
    let c = connect_with(
        &s,
        TEAM_A_API,
        "api",
        "application_name=orders options='-c search_path=audit,public'",
    )
    .await
    .expect("allowed parameters connect");
    let row = c
        .query_one("SELECT current_user::text, current_setting('search_path'), current_setting('application_name')", &[])
        .await
        .unwrap();
    let got: (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(got, ("api".into(), "audit,public".into(), "orders".into()));
}

/// Item 5: an explicit listener outside loopback is refused at start-up unless the
/// configuration says `expose: true`. Before the fix the node bound 0.0.0.0 and lent its
/// identity to anyone on the network.
#[test]
fn hardening_05_explicit_listener_outside_loopback_needs_expose() {
    let dir = std::env::temp_dir().join(format!("dbgw-h05-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("node.yaml");
    std::fs::write(
        &file,
        "proxy: {address: '127.0.0.1:1', server_name: proxy, ca: ca.crt}\nlisteners:\n  - {listen: '0.0.0.0:0', route: main, identity: {cert: w.crt, key: w.key}}\n",
    )
    .unwrap();
    let o = Command::new(gateway_bin())
        .args(["node", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("listeners: 0.0.0.0:0 is not a loopback address: anyone who can reach it would connect as the listener's identity"),
        "{err}"
    );
    assert!(err.contains("expose: true"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
