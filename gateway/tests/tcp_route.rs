//! `tcp` routes: plain L4 through node → mTLS → proxy → a real TCP echo server, with the
//! same identity, policy and audit as PostgreSQL sessions.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::role;
use gateway::harness::{Stack, TcpRoute, Workload};

const TCP_API: usize = 4;
const TCP_INTRUDER: usize = 5;
/// A postgres listener pointed at the tcp route: a misconfiguration the proxy must name.
const PG_ON_TCP: usize = 6;

/// An echo server on its own threads: echoes until the client half-closes, then closes.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

fn stack(echo: SocketAddr) -> Stack {
    let mut spec = common::spec();
    spec.workloads.extend([
        Workload::tcp("team-a", "api", "echo"),
        Workload::tcp("intruder", "x", "echo"),
        Workload {
            route: "echo".into(),
            ..Workload::new("team-a", "api")
        },
    ]);
    spec.tcp_routes.push(TcpRoute {
        name: "echo".into(),
        upstream: echo,
        intercept_port: 7,
    });
    // No db_users/db_names: they mean nothing on a tcp route.
    spec.roles
        .push(role("team-a-echo", "team-a", &["echo"], &[], &[]));
    Stack::start(spec).expect("start the stack with a tcp route")
}

fn round_trip(s: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
    s.write_all(payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).unwrap();
    back
}

#[test]
fn tcp_route_relays_bytes_both_ways_and_half_close() {
    let echo = echo_server();
    let s = stack(echo);
    let mut c = TcpStream::connect(s.listeners[TCP_API]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The client speaks first with one byte: nothing PostgreSQL-like is expected of it.
    assert_eq!(round_trip(&mut c, b"x"), b"x");
    let big: Vec<u8> = (0..(4 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    // Written from another thread: the echo comes back while we are still sending.
    let mut w = c.try_clone().unwrap();
    let sent = big.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent).unwrap();
        // Half-close: the echo server sees EOF only through node and proxy.
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    c.read_to_end(&mut back)
        .expect("echo until the server closes");
    writer.join().unwrap();
    assert_eq!(back.len(), big.len());
    assert!(back == big, "echoed bytes differ");

    // One start/end pair, protocol tcp, the bytes counted both ways.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let end = loop {
        let events = s.audit_events();
        if let Some(e) = events
            .iter()
            .find(|e| e["event"] == "db.session.end" && e["protocol"] == "tcp")
        {
            break e.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no tcp session end in the audit log: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(end["result"], "success");
    assert_eq!(end["database_route"], "echo");
    assert_eq!(end["role"], "team-a-echo");
    assert_eq!(
        end["identity"],
        "spiffe://demo.db-gateway.local/ns/team-a/sa/api"
    );
    assert_eq!(end["upstream_addr"], echo.to_string());
    assert_eq!(end["bytes_client_to_server"], 1 + big.len() as u64);
    assert_eq!(end["bytes_server_to_client"], 1 + big.len() as u64);
}

#[test]
fn tcp_route_refusals_close_and_are_audited() {
    let echo = echo_server();
    let s = stack(echo);

    // No role for the intruder on the echo route: the connection is closed, no byte
    // reaches the echo server or comes back.
    let mut c = TcpStream::connect(s.listeners[TCP_INTRUDER]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(b"hello");
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    assert!(got.is_empty(), "denied tcp client got bytes: {got:?}");
    let denied = s
        .audit_events()
        .into_iter()
        .find(|e| e["event"] == "db.session.start" && e["result"] == "denied")
        .expect("denied tcp session in the audit log");
    assert_eq!(denied["protocol"], "tcp");
    assert_eq!(denied["error_code"], "28000");
    assert!(
        denied["error_message"]
            .as_str()
            .unwrap()
            .contains("not allowed to use database \"echo\""),
        "{denied}"
    );

    // A PostgreSQL listener pointed at the tcp route: the client is told what is wrong.
    let answer = common::raw_exchange(
        s.listeners[PG_ON_TCP],
        &gateway::pg::encode_startup(&[("user", "api"), ("database", "app")]),
    );
    let e = common::only_error(&answer);
    assert_eq!(e.sqlstate, "08000");
    assert!(e.message.contains("is a tcp route"), "{}", e.message);
    assert!(
        e.hint.as_deref().unwrap_or("").contains("protocol: tcp"),
        "{e:?}"
    );
}

#[test]
fn tcp_route_upstream_down_closes_the_connection() {
    // The echo address is taken and closed again: nothing listens there.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let s = stack(closed);
    let mut c = TcpStream::connect(s.listeners[TCP_API]).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    assert!(got.is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(e) = s
            .audit_events()
            .into_iter()
            .find(|e| e["event"] == "db.session.end" && e["protocol"] == "tcp")
        {
            assert_eq!(e["result"], "error");
            assert_eq!(e["error_code"], "08001");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no audit end event");
        std::thread::sleep(Duration::from_millis(50));
    }
}
