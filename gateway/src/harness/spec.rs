//! What a [`Stack`](super::Stack) is made of: its workloads, routes, pods and the pieces of
//! policy and settings a test adds. Plain data; [`super::configs`] turns it into the node's
//! and proxy's configuration.
//!
//! The policy and settings a test adds are the [`crate::config`] structs themselves (roles,
//! databases, upstream reuse, the node's `data_plane`) or typed fields laid over the
//! harness's own ([`ProxySettings`]), never YAML text: a renamed or retyped setting breaks
//! the build of the test that uses it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{
    DataPlaneConfig, DatabaseConfig, DatabaseSelector, MatchConfig, ReuseConfig, RoleConfig,
};
use crate::route::Protocol;

pub const DEMO_TRUST_DOMAIN: &str = "demo.db-gateway.local";
/// The name in the proxy's certificate that nodes verify.
pub const PROXY_SERVER_NAME: &str = "proxy.db-gateway.local";
/// The database route every demo and test listener uses.
pub const ROUTE: &str = "main";

/// One workload: an explicit-mode node listener presenting this identity.
#[derive(Debug, Clone)]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
    /// Route the listener sends to (default [`ROUTE`]).
    pub route: String,
    /// The listener's protocol (a `tcp` listener needs a [`TcpRoute`] of that name).
    pub protocol: Protocol,
    /// Client TLS on the listener, with [`LISTENER_TLS_CERT`] (a server certificate for
    /// 127.0.0.1 and localhost from the workload CA, so the stack's trust bundle verifies it).
    pub client_tls: bool,
}

/// In the stack directory: the explicit listeners' client TLS certificate and key.
pub const LISTENER_TLS_CERT: &str = "listener-tls.crt";
pub const LISTENER_TLS_KEY: &str = "listener-tls.key";

impl Workload {
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            route: ROUTE.into(),
            protocol: Protocol::Postgres,
            client_tls: false,
        }
    }

    /// A listener of the same identity on `tcp` route `route`.
    pub fn tcp(namespace: &str, service_account: &str, route: &str) -> Self {
        Self {
            route: route.into(),
            protocol: Protocol::Tcp,
            ..Self::new(namespace, service_account)
        }
    }
}

/// A `tcp` route of the proxy (plain L4 to `upstream`).
#[derive(Debug, Clone)]
pub struct TcpRoute {
    pub name: String,
    pub upstream: SocketAddr,
    /// Transparent mode: pods reach it by dialling the database's address on this port.
    pub intercept_port: u16,
}

/// A `postgres` route of the proxy to the stack's own server.
#[derive(Debug, Clone)]
pub struct PgRoute {
    pub name: String,
    /// `upstream.reuse`; `None` for off.
    pub reuse: Option<ReuseConfig>,
    /// `upstream.admin_user` (automatic database users); `None` for none.
    pub admin_user: Option<String>,
}

/// Data-plane threads of a stack's node unless a test sets `data_plane.threads`.
pub const NODE_THREADS: usize = 2;

/// The node's `data_plane` of a stack: the defaults with [`NODE_THREADS`] threads. A test
/// that wants other knobs changes fields of this value (e.g. `threads`, `warm_tunnels`).
pub fn node_data_plane() -> DataPlaneConfig {
    DataPlaneConfig {
        threads: NODE_THREADS,
        ..DataPlaneConfig::default()
    }
}

/// Top-level proxy settings a test may change; `None` (the [`Default`]) keeps the
/// harness's value: `threads` 0 (one per CPU), and the [`crate::config`] defaults
/// `DEFAULT_DRAIN_GRACE` and `DEFAULT_TUNNEL_IDLE_TIMEOUT`.
#[derive(Debug, Clone, Default)]
pub struct ProxySettings {
    pub threads: Option<usize>,
    pub drain_grace: Option<Duration>,
    pub tunnel_idle_timeout: Option<Duration>,
    pub tls_handshake_timeout: Option<Duration>,
    pub upstream_login_timeout: Option<Duration>,
    pub max_connections: Option<usize>,
    pub max_sessions_per_identity: Option<usize>,
    pub max_sessions_per_route: Option<usize>,
    /// Environment of the proxy process beyond the test's own (e.g. AWS credentials).
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct StackSpec {
    /// The `gateway` binary to run for the proxy and the node.
    pub gateway_bin: PathBuf,
    pub workloads: Vec<Workload>,
    /// The `roles:` list of the proxy policy.
    pub roles: Vec<RoleConfig>,
    /// Top-level proxy settings laid over the harness's (e.g. `drain_grace`).
    pub proxy: ProxySettings,
    /// The node's `data_plane:` section, as written ([`node_data_plane`] for the harness's
    /// default of [`NODE_THREADS`] threads).
    pub data_plane: DataPlaneConfig,
    /// More entries of the proxy's `databases:` list, after the stack's own `postgres`
    /// routes and before its `tcp` routes. Relative paths are relative to the stack
    /// directory (e.g. `ca/workload-ca.crt`).
    pub extra_databases: Vec<DatabaseConfig>,
    /// `upstream.reuse` of the main route; `None` leaves reuse off, as it is by default.
    pub upstream_reuse: Option<ReuseConfig>,
    /// More `postgres` routes to the stack's own server (e.g. the same database with
    /// `upstream.reuse` on, next to the main route without it).
    pub pg_routes: Vec<PgRoute>,
    /// `tcp` routes on the proxy (and, in transparent mode, intercepted on their port).
    pub tcp_routes: Vec<TcpRoute>,
    /// SQL run as superuser once the database is up (roles, databases, grants).
    pub setup_sql: Vec<String>,
    /// Transparent mode: pods in namespaces and cgroups, intercepted by eBPF (root only).
    pub transparent: Option<TransparentSpec>,
    /// `pg_hba.conf` lines placed before the certificate-only rules (the benchmark's
    /// `direct` path and TLS peers log in over plain TCP with `hostnossl … trust`).
    pub extra_hba: Vec<String>,
}

/// One pod of the transparent demo or tests.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub host_network: bool,
    /// Left out of the inventory: a pod the resolver has not heard of (yet).
    pub unlisted: bool,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            service_account: service_account.into(),
            host_network: false,
            unlisted: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct TransparentSpec {
    pub pods: Vec<PodSpec>,
    /// The inventory's identity for processes outside any pod (`None` refuses them).
    pub host_identity: Option<(String, String)>,
    /// Also give the database, the agent and every namespaced pod an IPv6 address.
    pub ipv6: bool,
    /// The node gets its certificate by a token join (`gateway ca token create`, the CA's
    /// join listener) instead of from `node.crt`.
    pub join: bool,
    /// More flags for `gateway ca serve` (e.g. `--ttl 8s --node-cert-ttl 8s`).
    pub ca_args: Vec<String>,
}

/// In the stack directory (transparent mode): the CA service's pod inventory, and the node's
/// certificate and key for the CA service.
pub const INVENTORY: &str = "inventory.yaml";
pub const NODE_CERT: &str = "node.crt";
pub const NODE_KEY: &str = "node.key";
/// In the stack directory (transparent mode with `join`): the CA's hashed join tokens, and
/// the node's token.
pub const JOIN_TOKENS: &str = "join-tokens";
pub const JOIN_TOKEN: &str = "join-token";

pub const CA_SERVER_NAME: &str = "ca.db-gateway.local";
/// In the stack directory: the root the local PostgreSQL's server certificate chains to
/// (the workload root the stack started with; a copy, so that rotating the workload
/// root does not change what the proxy verifies the database by).
pub const DB_SERVER_CA: &str = "db-server-ca.crt";
/// The DNS name of the database route in transparent mode: its client TLS certificate
/// carries it (with the dialled IP), and the CA's `--server-names` allows it.
pub const DB_SERVER_NAME: &str = "db.demo.db-gateway.local";
/// In the stack directory: the trust bundle applications verify the node's client TLS with
/// (`sslrootcert=`): the gateway CA's root.
pub const TRUST_BUNDLE: &str = "trust-bundle.pem";
pub const NODE_NAME: &str = "demo-node";
/// Port of the agent address in tests and the demo.
pub const AGENT_PORT: u16 = 15432;

/// Owned copies of a list of names, as the config structs hold them.
pub fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// An allow role for the workloads of `namespace` over the routes `databases`, with these
/// database users and names (`{{ .service_account }}` templates allowed).
pub fn role(
    name: &str,
    namespace: &str,
    databases: &[&str],
    db_users: &[&str],
    db_names: &[&str],
) -> RoleConfig {
    RoleConfig {
        name: name.into(),
        matcher: MatchConfig {
            namespace: Some(namespace.into()),
            ..MatchConfig::default()
        },
        databases: DatabaseSelector {
            names: strings(databases),
            ..DatabaseSelector::default()
        },
        db_users: strings(db_users),
        db_names: strings(db_names),
        ..RoleConfig::default()
    }
}
