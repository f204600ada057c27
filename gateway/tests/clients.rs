//! Real command-line clients through the gateway: psql in every sslmode a node listener
//! meets, with wrong and empty passwords (never asked for, never used), and pgbench.

mod common;

use std::process::{Command, Output};

use common::*;

fn psql(conn: &str, sql: &str) -> Output {
    Command::new("psql")
        .arg(conn)
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env_remove("PGPASSWORD")
        .output()
        .expect("psql runs (package postgresql-client-15)")
}

#[test]
fn psql_with_disable_prefer_and_wrong_or_empty_password() {
    let s = stack();
    let base = s.conn_string(TEAM_A_API, "api", "app");
    for extra in [
        "sslmode=disable",
        "sslmode=prefer",
        "sslmode=prefer password=wrong",
        "sslmode=disable password=''",
        "sslmode=prefer gssencmode=prefer",
    ] {
        let conn = format!("{base} {extra}");
        let out = stdout(&psql(
            &conn,
            "select current_user || '@' || current_database()",
        ));
        assert_eq!(out, "api@app", "{extra}");
    }
    // sslmode=require cannot be met by a node listener (it answers SSLRequest with N):
    // psql must say so instead of silently going plaintext.
    let o = psql(&format!("{base} sslmode=require"), "select 1");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("server does not support SSL"));
}

#[test]
fn psql_prints_the_denial_message_and_hint() {
    let s = stack();
    let o = psql(&s.conn_string(INTRUDER, "x", "app"), "select 1");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("FATAL:  db-gateway: identity spiffe://demo.db-gateway.local/ns/intruder/sa/x is not allowed to use database \"main\""),
        "{err}"
    );
    assert!(
        err.contains("HINT:  No role in the gateway policy matches this workload; ask an operator to add one."),
        "{err}"
    );

    let o = psql(&s.conn_string(TEAM_A_API, "postgres", "app"), "select 1");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("may not log in to \"main\" as database user \"postgres\""),
        "{err}"
    );
    assert!(
        err.contains("HINT:  Allowed database users: \"api\", \"ghost\"."),
        "{err}"
    );
}

#[test]
fn pgbench_init_select_only_and_tpcb_with_8_clients() {
    let s = stack();
    let conn = s.conn_string(TEAM_A_API, "api", "app");
    let run = |args: &[&str]| {
        let o = Command::new("pgbench")
            .args(args)
            .arg(&conn)
            .output()
            .expect("pgbench runs (package postgresql-client-15)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "pgbench {args:?} failed:\n{text}");
        text
    };
    run(&["-i", "-s", "1", "-q"]);
    for args in [
        &["-S", "-c", "8", "-j", "2", "-t", "250", "-n"][..],
        &["-c", "8", "-j", "2", "-t", "100", "-n"][..],
    ] {
        let out = run(args);
        let want = if args.contains(&"-S") { 2000 } else { 800 };
        assert!(
            out.contains(&format!(
                "number of transactions actually processed: {want}/{want}"
            )),
            "pgbench {args:?}:\n{out}"
        );
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }
    // TPC-B wrote through the gateway: history has one row per transaction.
    let rows = s.pg.psql("select count(*) from pgbench_history").err();
    assert!(
        rows.is_some(),
        "pgbench tables live in database app, not postgres"
    );
    let count =
        s.pg.psql_db("app", "select count(*) from pgbench_history")
            .unwrap();
    assert_eq!(count.trim(), "800");
}
