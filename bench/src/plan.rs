//! What a run is made of and what it yields: the scenarios, the plan (durations and sizes)
//! and one path × scenario measurement. Shared by the run (`scenario.rs`) and the report
//! (`report.rs`), which import this and not each other.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::client;
use crate::pgbench::Workload;

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Pgbench(Workload),
    Client(client::Kind),
    /// Echo round trips of this many bytes through the path's `tcp` service.
    RoundTrip(usize),
    /// Idle connections through the path's `tcp` service: memory per connection.
    Idle,
}

#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub title: &'static str,
    pub kind: Kind,
}

/// `idle` comes first: RSS growth per connection is only meaningful on processes whose
/// heap has not been grown (and freed) by earlier scenarios. The second path over the same
/// node and proxy (`gateway-ebpf`) reuses what the first one freed and reads low.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "idle",
        title: "idle connections held open through a `tcp` route (RSS per connection)",
        kind: Kind::Idle,
    },
    Scenario {
        name: "select-8",
        title: "pgbench -S, 8 clients",
        kind: Kind::Pgbench(Workload {
            select_only: true,
            clients: 8,
            connect_per_tx: false,
        }),
    },
    Scenario {
        name: "select-64",
        title: "pgbench -S, 64 clients",
        kind: Kind::Pgbench(Workload {
            select_only: true,
            clients: 64,
            connect_per_tx: false,
        }),
    },
    Scenario {
        name: "tpcb-8",
        title: "pgbench TPC-B, 8 clients",
        kind: Kind::Pgbench(Workload {
            select_only: false,
            clients: 8,
            connect_per_tx: false,
        }),
    },
    Scenario {
        name: "connect-select-8",
        title: "pgbench -C -S, 8 clients (a connection per transaction)",
        kind: Kind::Pgbench(Workload {
            select_only: true,
            clients: 8,
            connect_per_tx: true,
        }),
    },
    Scenario {
        name: "setup-1",
        title: "connection set-up, 1 client, one at a time (harness client)",
        kind: Kind::Client(client::Kind::Connect),
    },
    Scenario {
        name: "latency-1",
        title: "1-row SELECT loop, 1 client (harness client)",
        kind: Kind::Client(client::Kind::Latency),
    },
    Scenario {
        name: "copy-out",
        title: "COPY … TO STDOUT (harness client)",
        kind: Kind::Client(client::Kind::CopyOut),
    },
    Scenario {
        name: "copy-in",
        title: "COPY … FROM STDIN (harness client)",
        kind: Kind::Client(client::Kind::CopyIn),
    },
    Scenario {
        name: "rtt-1",
        title: "1-byte request/response, 1 connection, `tcp` route to an echo server",
        kind: Kind::RoundTrip(1),
    },
    Scenario {
        name: "rtt-16k",
        title: "16 KiB request/response, 1 connection, `tcp` route to an echo server",
        kind: Kind::RoundTrip(16 * 1024),
    },
];

/// Durations and sizes of one run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Plan {
    pub quick: bool,
    pub warmup_s: u32,
    pub measure_s: u32,
    pub copy_bytes: u64,
    pub pgbench_scale: u32,
    /// Connections of the idle scenario.
    pub idle_connections: usize,
    /// How long the `gateway` path holds them (the "no growth" target's window); the
    /// other paths hold them `measure_s`.
    pub idle_hold_s: u32,
    /// Threads of each tunnel process (node agent, proxy, each HAProxy).
    pub threads: u16,
}

/// One path × scenario: named figures (see `report.rs` for their units).
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub path: String,
    pub scenario: String,
    pub figures: BTreeMap<String, f64>,
    /// Something a reader must know about these figures (e.g. fewer connections held).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}
