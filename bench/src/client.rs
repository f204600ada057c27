//! `bench client`: the harness's own PostgreSQL client (tokio-postgres), for what pgbench
//! cannot measure: COPY throughput, the latency of a 1-row select loop, connection set-up;
//! and its plain TCP client for the `tcp` route scenarios (echo round trips, idle
//! connections).
//!
//! It runs as a child of the orchestrator (so it can run inside a pod), prints `WARM` once
//! warm-up is over, then one JSON line with its [`Report`] when the measured phase ends.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, pin_mut};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, NoTls};

#[derive(clap::Args, Debug)]
pub struct Options {
    #[arg(value_enum)]
    pub kind: Kind,
    /// libpq-style connection string (PostgreSQL kinds).
    #[arg(long, default_value = "")]
    pub conn: String,
    /// `host:port` of the echo service (round-trip and idle kinds).
    #[arg(long, default_value = "")]
    pub addr: String,
    /// Bytes per round trip.
    #[arg(long, default_value_t = 1)]
    pub size: usize,
    /// Idle connections to open.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Seconds to hold the idle connections open.
    #[arg(long, default_value_t = 2.0)]
    pub hold: f64,
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Bytes to COPY.
    #[arg(long, default_value_t = 64 << 20)]
    pub bytes: u64,
    /// TLS to the server (the connection string says `sslmode=require`): the CA
    /// certificates (PEM) that verify it, by name or IP address like `verify-full`.
    #[arg(long)]
    pub tls_root: Option<PathBuf>,
    /// A client certificate and key (PEM) for servers that log in by certificate.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `COPY (…) TO STDOUT` of `--bytes`.
    CopyOut,
    /// `COPY copy_sink FROM STDIN` of `--bytes`.
    CopyIn,
    /// One connection, `SELECT 1` (prepared) in a loop.
    Latency,
    /// Connect (startup + authentication), one query, close; one at a time.
    Connect,
    /// One TCP connection to the echo service: write `--size` bytes, read them back.
    RoundTrip,
    /// Open `--count` TCP connections (each proven with a 1-byte echo), print `OPENED`,
    /// hold them `--hold` seconds, print `HELD`, close.
    Idle,
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            p50: h.value_at_quantile(0.50) as f64,
            p99: h.value_at_quantile(0.99) as f64,
            p999: h.value_at_quantile(0.999) as f64,
            max: h.max() as f64,
        }
    }
}

/// What one measured phase did.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    /// Transactions (latency), connections (connect) or COPY runs.
    pub count: u64,
    pub seconds: f64,
    pub bytes: u64,
    /// Per operation (latency, connect); absent for COPY.
    pub latency_us: Option<Percentiles>,
    /// Idle: why fewer connections than asked for were opened (the path refused more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
}

/// One line of COPY data: 1023 bytes of text and a newline.
const LINE: usize = 1024;

pub fn main(opts: Options) -> Result<()> {
    if opts.kind == Kind::Idle {
        println!("{}", serde_json::to_string(&idle(&opts)?)?);
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(run(&opts))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn warm() -> Result<()> {
    say("WARM")
}

/// One line to the orchestrator, flushed at once (it samples CPU and memory on it).
fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn tcp_connect(addr: &str) -> Result<TcpStream> {
    let s = TcpStream::connect(addr).with_context(|| format!("failed to connect to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(s)
}

/// Warm-up, `WARM`, then timed operations for the measured seconds. Each operation
/// returns the part of its time that is the figure (all of it, or a connection's set-up);
/// the report has their count and latency percentiles.
async fn timed<F, Fut>(o: &Options, bytes_per_op: u64, mut op: F) -> Result<Report>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Duration>>,
{
    let warm_end = Instant::now() + Duration::from_secs_f64(o.warmup);
    while Instant::now() < warm_end {
        op().await?;
    }
    warm()?;
    let mut h = Histogram::<u64>::new(3)?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(o.seconds);
    let mut count = 0u64;
    while Instant::now() < end {
        let took = op().await?;
        h.record(took.as_micros() as u64)?;
        count += 1;
    }
    Ok(Report {
        count,
        seconds: start.elapsed().as_secs_f64(),
        bytes: count * bytes_per_op,
        latency_us: Some(Percentiles::of(&h)),
        limit: None,
    })
}

/// Blocking socket calls (inside [`timed`]'s loop on a one-thread runtime, nothing else
/// runs there): the least client overhead in the figure, the same for every path.
async fn round_trip(o: &Options) -> Result<Report> {
    ensure!(o.size > 0, "--size must be at least 1");
    let mut s = tcp_connect(&o.addr)?;
    let out: Vec<u8> = (0..o.size).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; o.size];
    let mut once = || -> Result<Duration> {
        let t = Instant::now();
        s.write_all(&out)?;
        s.read_exact(&mut back)
            .context("the echo did not come back whole")?;
        let took = t.elapsed();
        ensure!(back == out, "the echo came back changed");
        Ok(took)
    };
    timed(o, 2 * o.size as u64, || std::future::ready(once())).await
}

/// Connections per batch: opened together, then proven together, so the tunnels' set-up
/// overlaps without flooding the listeners' accept queues.
const IDLE_BATCH: usize = 200;

/// Opens and proves one batch; an error names the connection that failed.
fn open_batch(o: &Options, first: usize, n: usize) -> Result<Vec<TcpStream>> {
    let mut batch = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = tcp_connect(&o.addr)
            .with_context(|| format!("connection {} of {}", first + i + 1, o.count))?;
        s.write_all(b"i")?;
        batch.push(s);
    }
    for (i, s) in batch.iter_mut().enumerate() {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .with_context(|| format!("no echo on connection {} of {}", first + i + 1, o.count))?;
    }
    Ok(batch)
}

/// A path that refuses more connections (a peer's own client limit) ends the opening
/// phase early: the connections already proven are held and measured, and the report
/// says why there are fewer. No connection at all is an error.
fn idle(o: &Options) -> Result<Report> {
    let start = Instant::now();
    let mut open: Vec<TcpStream> = Vec::with_capacity(o.count);
    let mut limit = None;
    while open.len() < o.count {
        let n = IDLE_BATCH.min(o.count - open.len());
        match open_batch(o, open.len(), n) {
            Ok(batch) => open.extend(batch),
            Err(e) if !open.is_empty() => {
                limit = Some(format!("{e:#}"));
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    say(&format!("OPENED {}", open.len()))?;
    std::thread::sleep(Duration::from_secs_f64(o.hold));
    // Sampled before the connections are used again (that traffic is not the hold's).
    say("HELD")?;
    // Still open at the end of the hold: every connection answers again.
    for (i, s) in open.iter_mut().enumerate() {
        s.write_all(b"j")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .with_context(|| format!("connection {i} died during the hold"))?;
    }
    Ok(Report {
        count: open.len() as u64,
        seconds,
        bytes: 0,
        latency_us: None,
        limit,
    })
}

/// How the PostgreSQL kinds connect: plain, or TLS with rustls (what the gateway's own
/// hops use, so a TLS path's figures compare one TLS stack with itself).
#[derive(Clone)]
enum Tls {
    None,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Tls {
    fn from_options(o: &Options) -> Result<Self> {
        let Some(root) = &o.tls_root else {
            return Ok(Self::None);
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in gateway::pki::load_certs(root)? {
            roots.add(c)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
        let config = match (&o.tls_cert, &o.tls_key) {
            (Some(cert), Some(key)) => builder.with_client_auth_cert(
                gateway::pki::load_certs(cert)?,
                gateway::pki::load_key(key)?,
            )?,
            _ => builder.with_no_client_auth(),
        };
        Ok(Self::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
            config,
        )))
    }
}

async fn connect(conn: &str, tls: &Tls) -> Result<Client> {
    let context = || format!("failed to connect ({conn})");
    let (client, connection) = match tls {
        Tls::None => {
            let (c, connection) = tokio_postgres::connect(conn, NoTls)
                .await
                .with_context(context)?;
            (c, tokio::spawn(connection))
        }
        Tls::Rustls(t) => {
            let (c, connection) = tokio_postgres::connect(conn, t.clone())
                .await
                .with_context(context)?;
            (c, tokio::spawn(connection))
        }
    };
    drop(connection);
    Ok(client)
}

async fn run(o: &Options) -> Result<Report> {
    let tls = &Tls::from_options(o)?;
    match o.kind {
        Kind::Latency => {
            let c = connect(&o.conn, tls).await?;
            let stmt = c.prepare("SELECT 1").await?;
            let (c, stmt) = (&c, &stmt);
            timed(o, 0, || async move {
                let t = Instant::now();
                c.query_one(stmt, &[]).await?;
                Ok(t.elapsed())
            })
            .await
        }
        Kind::Connect => {
            timed(o, 0, || async {
                // Set-up latency: TCP connect to ReadyForQuery.
                let t = Instant::now();
                let c = connect(&o.conn, tls).await?;
                let took = t.elapsed();
                c.simple_query("").await?;
                Ok(took)
            })
            .await
        }
        Kind::CopyOut => {
            let c = connect(&o.conn, tls).await?;
            // Warm-up: a small COPY through the same connection.
            copy_out(&c, (o.bytes / 16).max(LINE as u64)).await?;
            warm()?;
            let start = Instant::now();
            let bytes = copy_out(&c, o.bytes).await?;
            Ok(Report {
                count: 1,
                seconds: start.elapsed().as_secs_f64(),
                bytes,
                latency_us: None,
                limit: None,
            })
        }
        Kind::CopyIn => {
            let c = connect(&o.conn, tls).await?;
            copy_in(&c, (o.bytes / 16).max(LINE as u64)).await?;
            c.batch_execute("TRUNCATE copy_sink").await?;
            warm()?;
            let start = Instant::now();
            let bytes = copy_in(&c, o.bytes).await?;
            let seconds = start.elapsed().as_secs_f64();
            c.batch_execute("TRUNCATE copy_sink").await?;
            Ok(Report {
                count: 1,
                seconds,
                bytes,
                latency_us: None,
                limit: None,
            })
        }
        Kind::RoundTrip => round_trip(o).await,
        Kind::Idle => anyhow::bail!("idle runs without a runtime"),
    }
}

/// Streams `bytes` (rounded up to whole lines) from the server; returns the bytes received.
async fn copy_out(c: &Client, bytes: u64) -> Result<u64> {
    let lines = bytes.div_ceil(LINE as u64);
    let sql = format!(
        "COPY (SELECT repeat('x', {}) FROM generate_series(1, {lines})) TO STDOUT",
        LINE - 1
    );
    let stream = c.copy_out(&sql).await?;
    pin_mut!(stream);
    let mut got = 0u64;
    while let Some(chunk) = stream.next().await {
        got += chunk?.len() as u64;
    }
    ensure!(
        got == lines * LINE as u64,
        "COPY TO STDOUT returned {got} bytes, expected {}",
        lines * LINE as u64
    );
    Ok(got)
}

/// Streams `bytes` (rounded up to whole lines) to the server; returns the bytes sent.
async fn copy_in(c: &Client, bytes: u64) -> Result<u64> {
    // 64 lines per chunk: 64 KiB writes, one shared buffer (no per-chunk allocation).
    let mut block = Vec::with_capacity(64 * LINE);
    for _ in 0..64 {
        block.extend(std::iter::repeat_n(b'x', LINE - 1));
        block.push(b'\n');
    }
    let block = Bytes::from(block);
    let chunks = bytes.div_ceil(block.len() as u64);
    let sink = c.copy_in("COPY copy_sink FROM STDIN").await?;
    pin_mut!(sink);
    for _ in 0..chunks {
        sink.feed(block.clone()).await?;
    }
    let rows = sink.finish().await?;
    ensure!(
        rows == chunks * 64,
        "COPY FROM STDIN stored {rows} rows, expected {}",
        chunks * 64
    );
    Ok(chunks * block.len() as u64)
}
