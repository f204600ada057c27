//! Issue 20, wire fidelity: an application cannot tell the gateway from its database.

mod common;

use common::*;
use gateway::harness::Stack;

/// Item 3: with the demo's policy, a mistyped database is refused as PostgreSQL refuses it
/// (3D000), not replaced by the workload's own database. Before the change the demo forced
/// `app` and `dbname=nosuchdb` connected to it.
#[tokio::test]
async fn issue_20_a_requested_database_that_is_not_allowed_gets_3d000() {
    let spec = gateway::harness::demo::spec(gateway_bin(), false);
    let s = Stack::start(spec).expect("demo stack");
    let e = connect(&s, 0, "app", "nosuchdb").await.unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "3D000", "{e}");
    assert!(db.message().contains("\"nosuchdb\""), "{e}");
    assert_eq!(db.hint(), Some("Allowed database names: \"app\"."));

    // Another user is refused too, with the allowed one named, not silently replaced.
    let e = connect(&s, 0, "postgres", "app").await.unwrap_err();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28000", "{e}");
    assert_eq!(db.hint(), Some("Allowed database users: \"app\"."));

    // The demo's own connection string works and lands where it says.
    let c = connect(&s, 0, "app", "app").await.unwrap();
    let row = c
        .query_one("SELECT current_user::text, current_database()::text", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("app".into(), "app".into())
    );
}

/// A raw protocol session through `addr`: startup as `user`/`db`, reading to the first
/// ReadyForQuery. Returns the stream and the pid of its `BackendKeyData`.
fn raw_session(addr: std::net::SocketAddr, user: &str, db: &str) -> (std::net::TcpStream, i32) {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    c.write_all(&gateway::pg::encode_startup(&[
        ("user", user),
        ("database", db),
    ]))
    .unwrap();
    let mut pid = None;
    for (tag, body) in read_until_ready(&mut c) {
        match tag {
            b'K' => pid = Some(i32::from_be_bytes(body[..4].try_into().unwrap())),
            b'E' => panic!(
                "login failed: {:?}",
                gateway::pg::ErrorResponse::parse(&body)
            ),
            _ => {}
        }
    }
    (c, pid.expect("BackendKeyData"))
}

/// Messages up to and including ReadyForQuery (or to the end of the stream).
fn read_until_ready(c: &mut std::net::TcpStream) -> Vec<(u8, Vec<u8>)> {
    use std::io::Read;
    let mut out = Vec::new();
    loop {
        let mut head = [0u8; 5];
        if c.read_exact(&mut head).is_err() {
            return out;
        }
        let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len - 4];
        c.read_exact(&mut body).unwrap();
        let ready = head[0] == b'Z';
        out.push((head[0], body));
        if ready {
            return out;
        }
    }
}

/// Sends a simple query and returns its messages up to ReadyForQuery.
fn simple_query(c: &mut std::net::TcpStream, sql: &str) -> Vec<(u8, Vec<u8>)> {
    use std::io::Write;
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    c.write_all(&q).unwrap();
    read_until_ready(c)
}

/// The first column of the first DataRow, as text.
fn first_value(msgs: &[(u8, Vec<u8>)]) -> String {
    let (_, row) = msgs.iter().find(|(t, _)| *t == b'D').expect("a row");
    let len = i32::from_be_bytes(row[2..6].try_into().unwrap()) as usize;
    String::from_utf8(row[6..6 + len].to_vec()).unwrap()
}

/// Item 2: the pid a client gets in BackendKeyData is its backend's: equal to
/// `pg_backend_pid()`, to `pg_stat_activity.pid` and to the pid of its own notifications;
/// `pg_terminate_backend` of it ends the session the way PostgreSQL does, promptly; and a
/// cancel with the key still reaches the query. Before the change the proxy sent a random
/// pid of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_20_the_client_sees_its_real_backend_pid() {
    let s = stack();
    let node = s.listeners[TEAM_A_API];
    let (mut c, pid) = raw_session(node, "api", "app");
    assert_eq!(
        first_value(&simple_query(&mut c, "SELECT pg_backend_pid()")),
        pid.to_string()
    );
    let in_activity = simple_query(
        &mut c,
        &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND usename = 'api'"),
    );
    assert_eq!(first_value(&in_activity), "1");
    let notified = simple_query(&mut c, "LISTEN ch; NOTIFY ch, 'x'");
    let (_, n) = notified
        .iter()
        .find(|(t, _)| *t == b'A')
        .expect("own notification");
    assert_eq!(i32::from_be_bytes(n[..4].try_into().unwrap()), pid);

    // Terminating its own backend: 57P01 FATAL, then the connection closes, promptly.
    let t0 = std::time::Instant::now();
    let end = simple_query(&mut c, "SELECT pg_terminate_backend(pg_backend_pid())");
    let (_, e) = end
        .iter()
        .find(|(t, _)| *t == b'E')
        .expect("an ErrorResponse");
    let e = gateway::pg::ErrorResponse::parse(e).unwrap();
    assert_eq!(e.sqlstate, "57P01", "{e:?}");
    assert_eq!(
        e.message,
        "terminating connection due to administrator command"
    );
    assert!(
        read_until_ready(&mut c).is_empty(),
        "connection closed after FATAL"
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );

    // tokio-postgres's cancel (its own key) still cancels the query.
    let client = connect(&s, TEAM_A_API, "api", "app").await.unwrap();
    let token = client.cancel_token();
    let q = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    assert_eq!(sqlstate(&q.await.unwrap().unwrap_err()), "57014");
}
