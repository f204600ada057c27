//! Issue 20: cancel routing across proxy replicas. Two proxy processes (replica_index 0
//! and 1) behind one service address (a round-robin TCP forwarder standing in for a
//! Kubernetes Service), and a node whose `proxy.address` is the service and whose
//! `proxy.replicas` names each replica: every session's cancel reaches the replica that
//! carries it, wherever the service would have sent it.

mod common;

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use gateway::config::{NodeConfig, ProxyConfig};
use gateway::harness::{Stack, stop_child};

/// The second replica and the service in front of both; stopped on drop (the first
/// replica and the new node are the stack's own `proxy` and `node`, stopped with it).
struct Replicas {
    second: Child,
    admins: [SocketAddr; 2],
    /// The node's listener for workload 0, after the node's restart.
    listener: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Set: the service closes every new connection (see the test).
    service_down: Arc<AtomicBool>,
}

impl Drop for Replicas {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        stop_child(&mut self.second, Duration::from_secs(5));
    }
}

/// Replaces the stack's proxy with two replicas of the same configuration (index 0 and 1,
/// audit files of their own) behind a round-robin forwarder, and restarts the node with
/// `proxy.address` the forwarder and `proxy.replicas` both replicas' own addresses.
fn two_replicas(s: &mut Stack) -> Replicas {
    let mut old = s.proxy.take().expect("a proxy");
    stop_child(&mut old, Duration::from_secs(5));
    let base: ProxyConfig =
        serde_norway::from_str(&std::fs::read_to_string(&s.proxy_config).unwrap()).unwrap();
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    let mut admins = Vec::new();
    for index in 0..2u8 {
        let mut cfg = base.clone();
        cfg.replica_index = Some(index);
        cfg.audit.path = format!("audit-{index}.jsonl");
        let path = s.dir.join(format!("proxy-{index}.yaml"));
        std::fs::write(&path, serde_norway::to_string(&cfg).unwrap()).unwrap();
        let (child, admin, listening) = s
            .spawn_started(
                &format!("proxy-{index}"),
                &["proxy", "--config", &path.to_string_lossy()],
                1,
            )
            .unwrap();
        children.push(child);
        addrs.push(listening[0]);
        admins.push(admin);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let service_down = Arc::new(AtomicBool::new(false));
    let service = round_robin(addrs.clone(), stop.clone(), service_down.clone());

    let mut node = s.node.take().expect("a node");
    stop_child(&mut node, Duration::from_secs(5));
    let mut cfg: NodeConfig =
        serde_norway::from_str(&std::fs::read_to_string(&s.node_config).unwrap()).unwrap();
    cfg.proxy.address = service.to_string();
    cfg.proxy.replicas = addrs.iter().map(ToString::to_string).collect();
    let path = s.dir.join("node-replicas.yaml");
    std::fs::write(&path, serde_norway::to_string(&cfg).unwrap()).unwrap();
    let (node, _, listening) = s
        .spawn_started(
            "node-replicas",
            &["node", "--config", &path.to_string_lossy()],
            cfg.listeners.len(),
        )
        .unwrap();
    s.node = Some(node);
    let second = children.pop().unwrap();
    s.proxy = children.pop();
    Replicas {
        second,
        admins: [admins[0], admins[1]],
        listener: listening[0],
        stop,
        service_down,
    }
}

/// A TCP forwarder on loopback that sends each connection to the next of `to` in turn
/// (what a Service's load balancing does, for the purpose of this test), or closes it
/// while `down` is set.
fn round_robin(to: Vec<SocketAddr>, stop: Arc<AtomicBool>, down: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    let next = AtomicUsize::new(0);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let client = match l.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => panic!("accept: {e}"),
            };
            if down.load(Ordering::Relaxed) {
                continue;
            }
            client.set_nonblocking(false).unwrap();
            let i = next.fetch_add(1, Ordering::Relaxed) % to.len();
            let Ok(server) = TcpStream::connect(to[i]) else {
                continue;
            };
            for (mut a, mut b) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    addr
}

fn metrics_of(admin: SocketAddr, name: &str, label: &str) -> f64 {
    metric_with(&scrape(admin), name, label).unwrap_or(0.0)
}

/// Sessions spread over both replicas by the service; with the service then closing
/// every connection, each query is still cancelled (57014, within seconds of its cancel)
/// because each cancel went straight to its own replica; each replica forwarded exactly
/// the cancels of its own sessions and saw no unknown key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_20_cancels_reach_the_replica_that_carries_the_session() {
    let mut s = stack();
    let r = two_replicas(&mut s);
    let conn = format!(
        "host=127.0.0.1 port={} user=api dbname=app sslmode=disable",
        r.listener.port()
    );
    const N: usize = 6;
    let mut clients = Vec::new();
    for _ in 0..N {
        let (c, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        clients.push(c);
    }
    let active = |i: usize| metrics_of(r.admins[i], "gateway_proxy_active_sessions", "");
    let deadline = Instant::now() + Duration::from_secs(5);
    while active(0) + active(1) < N as f64 {
        assert!(Instant::now() < deadline, "{} + {}", active(0), active(1));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let per_replica = [active(0), active(1)];
    assert!(
        per_replica[0] >= 1.0 && per_replica[1] >= 1.0,
        "the service spread the sessions: {per_replica:?}"
    );

    // From now on the service closes every connection: a cancel gets through only if the
    // node sends it straight to its replica (through the service it would have reached a
    // random one, which drops a key it does not hold, and the query would run on).
    r.service_down.store(true, Ordering::Relaxed);
    let mut running = Vec::new();
    for c in clients {
        let token = c.cancel_token();
        let q = tokio::spawn(async move { c.simple_query("SELECT pg_sleep(60)").await });
        running.push((token, q));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    for (token, _) in &running {
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    }
    for (_, q) in running {
        let e = tokio::time::timeout(Duration::from_secs(10), q)
            .await
            .expect("the query was cancelled, not left running")
            .unwrap()
            .unwrap_err();
        assert_eq!(sqlstate(&e), "57014", "{e}");
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A replica counts a cancel once the server has closed the cancel connection, which
    // may come just after the client saw its 57014: wait a little for the counts.
    let counts = |i: usize| {
        let count = |result: &str| {
            metrics_of(
                r.admins[i],
                "gateway_proxy_cancel_requests_total",
                &format!("result=\"{result}\""),
            )
        };
        (count("forwarded"), count("unknown_key"))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while (0..2).any(|i| counts(i).0 < per_replica[i]) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, want) in per_replica.iter().enumerate() {
        assert_eq!(counts(i), (*want, 0.0), "replica {i}");
    }
    for i in 0..2 {
        let audit = std::fs::read_to_string(Path::new(&s.dir).join(format!("audit-{i}.jsonl")))
            .unwrap_or_default();
        assert!(
            audit.contains("db.cancel"),
            "replica {i} audited its cancels"
        );
    }
}
