//! Issue 20: the rest of the protocol, end to end. A raw protocol client speaks the same
//! bytes to the server directly (plain TCP, `trust` for this test's server) and through the
//! gateway (the node's listener for team-a/api, same user and database) and asserts the
//! same answers: `NegotiateProtocolVersion` for 3.2 and `_pq_.` options, `ParameterStatus`
//! mid-session, `NoticeResponse`, `CopyBoth` (replication refused unless the route allows
//! it), DataRows of tens of MB, pipelined extended-protocol batches, `Terminate`
//! mid-pipeline.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use gateway::harness::Stack;

/// The stack of `common`, plus plain-TCP `trust` logins to the server for the direct path
/// (the proxy's logins are TLS, so they still meet `hostssl … cert`), physical replication
/// included.
fn stack() -> Stack {
    let mut spec = spec();
    spec.extra_hba = vec![
        "hostnossl replication all 127.0.0.1/32 trust".into(),
        "hostnossl all all 127.0.0.1/32 trust".into(),
        "hostssl replication all 127.0.0.1/32 cert".into(),
    ];
    Stack::start(spec).expect("stack")
}

fn direct(s: &Stack) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], s.pg.port))
}

fn through_gateway(s: &Stack) -> SocketAddr {
    s.listeners[TEAM_A_API]
}

type Msg = (u8, Vec<u8>);

/// A raw protocol connection with its own read buffer.
struct Conn {
    c: TcpStream,
}

impl Conn {
    /// Connects and sends a startup packet of protocol `3.minor` with `params`.
    fn start(addr: SocketAddr, minor: u16, params: &[(&str, &str)]) -> Self {
        let c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut body = ((3u32 << 16) | u32::from(minor)).to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        let mut conn = Conn { c };
        conn.c.write_all(&packet).unwrap();
        conn
    }

    /// A 3.0 session as api/app, read up to its first ReadyForQuery.
    fn login(addr: SocketAddr, extra: &[(&str, &str)]) -> (Self, Vec<Msg>) {
        let mut params = vec![("user", "api"), ("database", "app")];
        params.extend_from_slice(extra);
        let mut c = Self::start(addr, 0, &params);
        let hello = c.until_ready();
        assert!(
            hello.iter().all(|(t, _)| *t != b'E'),
            "login failed: {:?}",
            errors(&hello)
        );
        (c, hello)
    }

    /// One message, or `None` at a clean end of stream.
    fn read(&mut self) -> Option<Msg> {
        let mut head = [0u8; 5];
        match self.c.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => panic!("read: {e}"),
        }
        let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len - 4];
        self.c.read_exact(&mut body).unwrap();
        Some((head[0], body))
    }

    /// Messages up to and including ReadyForQuery, or to the end of the stream.
    fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.read() {
            let ready = m.0 == b'Z';
            out.push(m);
            if ready {
                break;
            }
        }
        out
    }

    fn query(&mut self, sql: &str) -> Vec<Msg> {
        self.c.write_all(&gateway::pg::query(sql)).unwrap();
        self.until_ready()
    }
}

fn errors(msgs: &[Msg]) -> Vec<gateway::pg::ErrorResponse> {
    msgs.iter()
        .filter(|(t, _)| *t == b'E')
        .filter_map(|(_, b)| gateway::pg::ErrorResponse::parse(b))
        .collect()
}

fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|(t, _)| *t as char).collect()
}

/// A frontend message: tag, then length and body.
fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Parse (unnamed or `name`), Bind with one text parameter, Execute: one pipelined query.
fn extended(name: &str, sql: &str, param: &str) -> Vec<u8> {
    let mut parse = Vec::new();
    cstr(&mut parse, name);
    cstr(&mut parse, sql);
    parse.extend_from_slice(&0u16.to_be_bytes());
    let mut bind = Vec::new();
    cstr(&mut bind, "");
    cstr(&mut bind, name);
    bind.extend_from_slice(&0u16.to_be_bytes()); // parameter formats: text
    bind.extend_from_slice(&1u16.to_be_bytes());
    bind.extend_from_slice(&(param.len() as i32).to_be_bytes());
    bind.extend_from_slice(param.as_bytes());
    bind.extend_from_slice(&0u16.to_be_bytes()); // result formats: text
    let mut execute = Vec::new();
    cstr(&mut execute, "");
    execute.extend_from_slice(&0i32.to_be_bytes());
    let mut out = frame(b'P', &parse);
    out.extend(frame(b'B', &bind));
    out.extend(frame(b'E', &execute));
    out
}

const SYNC: [u8; 5] = [b'S', 0, 0, 0, 4];

/// The messages of a session's greeting that must match between the paths: all but
/// BackendKeyData (another backend, another secret).
fn comparable(hello: &[Msg]) -> Vec<Msg> {
    hello.iter().filter(|(t, _)| *t != b'K').cloned().collect()
}

/// A newer minor version and `_pq_.` options get the NegotiateProtocolVersion PostgreSQL
/// sends (newest minor 0, the options it does not know), then the session proceeds.
#[test]
fn negotiate_protocol_version_for_3_2_and_pq_options() {
    let s = stack();
    let run = |addr| {
        let mut c = Conn::start(
            addr,
            2,
            &[
                ("user", "api"),
                ("database", "app"),
                ("_pq_.compression", "on"),
                ("_pq_.other", "x"),
            ],
        );
        let hello = c.until_ready();
        let after = c.query("SELECT 1");
        (hello, after)
    };
    let (d_hello, d_after) = run(direct(&s));
    let (g_hello, g_after) = run(through_gateway(&s));
    assert_eq!(d_hello[0].0, b'v', "{}", tags(&d_hello));
    // The newest version the server speaks (3.0, as a whole version code), then the
    // options it ignored.
    let mut want = (3u32 << 16).to_be_bytes().to_vec();
    want.extend_from_slice(&2u32.to_be_bytes());
    want.extend_from_slice(b"_pq_.compression\0_pq_.other\0");
    assert_eq!(
        d_hello[0].1, want,
        "the server's own NegotiateProtocolVersion"
    );
    assert_eq!(comparable(&g_hello), comparable(&d_hello));
    assert_eq!(g_after, d_after);
    // A plain 3.0 startup gets none.
    let (_, hello) = Conn::login(through_gateway(&s), &[]);
    assert!(!hello.iter().any(|(t, _)| *t == b'v'));
}

/// `ParameterStatus` when the session changes a reported setting, `NoticeResponse` from
/// RAISE NOTICE and from the server itself: the same messages, byte for byte.
#[test]
fn parameter_status_and_notices_mid_session() {
    let s = stack();
    let run = |addr| {
        let (mut c, _) = Conn::login(addr, &[("application_name", "before")]);
        let mut out = Vec::new();
        for sql in [
            "SET application_name = 'compat20'",
            "SET timezone = 'Asia/Kolkata'",
            "SET DateStyle = 'German'",
            "DO $$ BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END $$",
            "ROLLBACK",
            "SELECT current_setting('application_name'), now()::date = current_date",
        ] {
            out.push(c.query(sql));
        }
        out
    };
    let d = run(direct(&s));
    let g = run(through_gateway(&s));
    assert_eq!(g, d);
    let status = |msgs: &[Msg]| -> Vec<String> {
        msgs.iter()
            .filter(|(t, _)| *t == b'S')
            .map(|(_, b)| String::from_utf8_lossy(b).replace('\0', "="))
            .collect()
    };
    assert_eq!(status(&g[0]), ["application_name=compat20="]);
    assert_eq!(status(&g[1]), ["TimeZone=Asia/Kolkata="]);
    assert_eq!(status(&g[2]), ["DateStyle=German, DMY="]);
    let notices: Vec<String> = g[3]
        .iter()
        .chain(g[4].iter())
        .filter(|(t, _)| *t == b'N')
        .map(|(_, b)| gateway::pg::ErrorResponse::parse(b).unwrap().message)
        .collect();
    // The last one is the server's own "there is no transaction in progress".
    assert_eq!(
        notices,
        ["hello 42", "careful", "there is no transaction in progress"]
    );
}

/// DataRows of tens of MB (one column of 40 MiB, then a row of three 8 MiB columns) arrive
/// whole and identical.
#[test]
fn large_data_rows() {
    let s = stack();
    let run = |addr| {
        let (mut c, _) = Conn::login(addr, &[]);
        let big = c.query("SELECT repeat('x', 40 * 1024 * 1024) || 'end'");
        let wide = c.query(
            "SELECT repeat('a', 8 << 20), repeat('b', 8 << 20), repeat('c', 8 << 20) FROM generate_series(1, 2)",
        );
        let after = c.query("SELECT 'still in sync'");
        (big, wide, after)
    };
    let t = Instant::now();
    let d = run(direct(&s));
    let g = run(through_gateway(&s));
    let (_, row) = g.0.iter().find(|(t, _)| *t == b'D').expect("a DataRow");
    assert_eq!(row.len(), 2 + 4 + 40 * 1024 * 1024 + 3);
    assert!(row.ends_with(b"end"));
    assert_eq!(tags(&g.1), "TDDCZ");
    assert!(g.0 == d.0 && g.1 == d.1 && g.2 == d.2, "answers differ");
    eprintln!("large rows both ways in {:?}", t.elapsed());
}

/// Many Parse/Bind/Execute then one Sync, written while the answers are read (a client
/// that writes the whole batch first would deadlock on full socket buffers with any
/// server). An error in the middle skips the rest to the Sync, as PostgreSQL does; the
/// next batch runs. The answers are the same bytes on both paths.
#[test]
fn pipelined_extended_batches() {
    let s = stack();
    const N: usize = 3000;
    let mut batch = Vec::new();
    batch.extend(extended("s1", "SELECT $1::int * 2", "0"));
    for i in 0..N {
        batch.extend(extended(
            "",
            "SELECT $1::int + 1, repeat('p', 100)",
            &i.to_string(),
        ));
    }
    batch.extend_from_slice(&SYNC);
    for i in 0..50 {
        batch.extend(extended("", "SELECT 1 / ($1::int - 25)", &i.to_string()));
    }
    batch.extend_from_slice(&SYNC);
    batch.extend(extended("", "SELECT $1::text", "after the error"));
    batch.extend_from_slice(&SYNC);
    let run = |addr| {
        let (mut c, _) = Conn::login(addr, &[]);
        let mut w = c.c.try_clone().unwrap();
        let batch = batch.clone();
        let writer = std::thread::spawn(move || w.write_all(&batch).unwrap());
        let out = [c.until_ready(), c.until_ready(), c.until_ready()];
        writer.join().unwrap();
        out
    };
    let t = Instant::now();
    let d = run(direct(&s));
    let g = run(through_gateway(&s));
    eprintln!("pipelines both ways in {:?}", t.elapsed());
    // Per query ParseComplete, BindComplete, DataRow, CommandComplete; one ReadyForQuery.
    assert_eq!(g[0].len(), 4 * (N + 1) + 1);
    assert!(tags(&g[0]).ends_with("12DCZ"));
    // The 26th query divides by zero (at Bind: the custom plan folds the parameter in):
    // 25 answered, its ParseComplete, the error, then nothing until Sync.
    assert_eq!(tags(&g[1]), format!("{}1EZ", "12DC".repeat(25)));
    assert_eq!(errors(&g[1])[0].sqlstate, "22012");
    assert_eq!(tags(&g[2]), "12DCZ");
    assert!(g == d, "answers differ");
}

/// `Terminate` in the middle of a pipeline (no Sync): the server answers what came before
/// and closes; through the gateway the connection ends cleanly, the backend is gone and
/// the proxy holds no session for it.
#[test]
fn terminate_mid_pipeline() {
    let s = stack();
    let run = |addr, name: &str| {
        let (mut c, _) = Conn::login(addr, &[("application_name", name)]);
        let mut bytes = Vec::new();
        for i in 0..20 {
            bytes.extend(extended(
                "",
                "SELECT $1::int, pg_sleep(0.01)",
                &i.to_string(),
            ));
        }
        bytes.extend_from_slice(&gateway::pg::TERMINATE);
        // Never reached: the server stops reading at Terminate.
        bytes.extend(extended("", "SELECT 1", "0"));
        bytes.extend_from_slice(&SYNC);
        c.c.write_all(&bytes).unwrap();
        let t = Instant::now();
        let mut got = Vec::new();
        while let Some(m) = c.read() {
            got.push(m);
        }
        (got, t.elapsed())
    };
    let (d, _) = run(direct(&s), "compat20-direct");
    let (g, took) = run(through_gateway(&s), "compat20-gateway");
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    assert_eq!(tags(&g), tags(&d));
    assert!(g == d, "answers differ");
    let gone = |name: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n =
                s.pg.psql(&format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{name}'"
                ))
                .unwrap();
            if n.trim() == "0" {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert!(
        gone("compat20-gateway"),
        "the backend outlived its Terminate"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let active = || metric(&scrape(s.proxy_admin), "gateway_proxy_active_sessions");
    while active() != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the proxy still holds a session: {:?}",
            active()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ends = s
        .audit_events()
        .into_iter()
        .filter(|e| e["event"] == "db.session.end")
        .count();
    assert_eq!(ends, 1, "one session, one end record");
}

/// `replication=database` (a walsender, whose streaming is CopyBoth) is refused with
/// `42501` and a hint naming the switch, as PostgreSQL refuses a user without REPLICATION;
/// a route that lists `replication` in `upstream.startup_parameters` passes it on, and a
/// physical stream starts (CopyBothResponse) and ends (CopyDone) as it does directly.
#[test]
fn replication_is_refused_unless_the_route_allows_it() {
    let mut s = stack();
    let refused = |addr| {
        let mut c = Conn::start(
            addr,
            0,
            &[
                ("user", "api"),
                ("database", "app"),
                ("replication", "database"),
            ],
        );
        let msgs = c.until_ready();
        (tags(&msgs), errors(&msgs).remove(0))
    };
    // The server refuses after authentication (AuthenticationOk, then the error); the
    // gateway before it logs in at all.
    let (d_tags, d) = refused(direct(&s));
    let (g_tags, g) = refused(through_gateway(&s));
    assert_eq!((d_tags.as_str(), g_tags.as_str()), ("RE", "E"));
    assert_eq!(d.sqlstate, "42501", "{d:?}");
    assert_eq!(g.sqlstate, d.sqlstate, "{g:?}");
    assert!(g.message.contains("\"replication\""), "{g:?}");
    assert!(
        g.hint
            .as_deref()
            .unwrap()
            .contains("unless the route lists \"replication\" in upstream.startup_parameters"),
        "{g:?}"
    );

    // The switch: the proxy restarted on the same address with the route allowing it.
    s.pg.psql("ALTER ROLE api REPLICATION").unwrap();
    restart_proxy_allowing_replication(&mut s);
    let stream = |addr| {
        let mut c = Conn::start(
            addr,
            0,
            &[
                ("user", "api"),
                ("database", "app"),
                ("replication", "true"),
            ],
        );
        let hello = c.until_ready();
        assert!(errors(&hello).is_empty(), "{:?}", errors(&hello));
        let ident = c.query("IDENTIFY_SYSTEM");
        let (_, row) = ident.iter().find(|(t, _)| *t == b'D').expect("a row");
        // Columns: systemid, timeline, xlogpos, dbname.
        let mut cols = Vec::new();
        let mut at = 2;
        for _ in 0..4 {
            let len = i32::from_be_bytes(row[at..at + 4].try_into().unwrap());
            at += 4;
            if len < 0 {
                cols.push(String::new());
                continue;
            }
            cols.push(String::from_utf8(row[at..at + len as usize].to_vec()).unwrap());
            at += len as usize;
        }
        c.c.write_all(&gateway::pg::query(&format!(
            "START_REPLICATION PHYSICAL {}",
            cols[2]
        )))
        .unwrap();
        let (tag, _) = c.read().expect("an answer");
        assert_eq!(tag, b'W', "CopyBothResponse");
        c.c.write_all(&frame(b'c', &[])).unwrap();
        // Keepalives (CopyData) may come first; then CopyDone, CommandComplete and
        // ReadyForQuery.
        let rest: String = tags(&c.until_ready()).replace('d', "");
        let after = c.query("IDENTIFY_SYSTEM");
        (rest, tags(&after))
    };
    let d = stream(direct(&s));
    let g = stream(through_gateway(&s));
    assert_eq!(g, d);
    assert!(d.0.ends_with("Z"), "{d:?}");
}

/// Stops the stack's proxy and starts it again from its own file with the main route
/// allowing `replication`, on the same address (the node's listeners dial it).
fn restart_proxy_allowing_replication(s: &mut Stack) {
    let mut old = s.proxy.take().expect("a proxy");
    gateway::harness::stop_child(&mut old, Duration::from_secs(5));
    let text = std::fs::read_to_string(&s.proxy_config).unwrap();
    let mut cfg: gateway::config::ProxyConfig = serde_norway::from_str(&text).unwrap();
    cfg.listen = s.proxy_addr;
    for d in &mut cfg.databases {
        if d.name == "main" {
            d.upstream.startup_parameters.push("replication".into());
        }
    }
    std::fs::write(&s.proxy_config, serde_norway::to_string(&cfg).unwrap()).unwrap();
    let config = s.proxy_config.to_string_lossy().into_owned();
    let child = s
        .spawn_args("proxy-2", &["proxy", "--config", &config])
        .unwrap();
    s.proxy = Some(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s.log("proxy-2").contains("LISTENING ") {
        assert!(Instant::now() < deadline, "{}", s.log("proxy-2"));
        std::thread::sleep(Duration::from_millis(20));
    }
}
