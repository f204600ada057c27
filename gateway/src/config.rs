//! Every setting in one place: the YAML files of `gateway node` and `gateway proxy`.
//!
//! Unknown fields are errors (a typo must not silently fall back to a default), and every
//! error names the file, line, column and field. Relative paths inside a file are relative
//! to that file, so a config directory can be moved as a whole.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use crate::tunnel::PodMeta;

/// Default address of the admin endpoints (`/metrics`, `/healthz`, `/readyz`).
pub const DEFAULT_NODE_ADMIN: &str = "127.0.0.1:9101";
pub const DEFAULT_PROXY_ADMIN: &str = "127.0.0.1:9102";
/// PostgreSQL's own `authentication_timeout` default is 60 s; a gateway that holds a slot
/// per half-open client wants less.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);
/// Short enough that a leaked key is soon useless, long enough that one signature serves
/// a burst of logins (the issuer reuses a certificate for half its life).
pub const DEFAULT_DB_CLIENT_CERT_TTL: Duration = Duration::from_secs(10 * 60);
/// One TLS record of plaintext: the unit the relay coalesces to.
pub const TLS_RECORD_PAYLOAD: usize = 16 * 1024;
/// Per connection and direction: bytes read but not yet written stay under this.
pub const DEFAULT_BUFFER_BUDGET: usize = 64 * 1024;

/// What a route carries. The node, the preamble and the proxy's database entry must agree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// PostgreSQL: encryption requests answered at the node, policy on user and database,
    /// certificate login upstream, `ErrorResponse`s, cancel, drain at transaction ends.
    #[default]
    Postgres,
    /// Plain L4: bytes relayed as they are to `upstream.address` (no TLS, no login); the
    /// policy decides on identity and route only. For other TCP databases and for tests.
    Tcp,
}

impl Protocol {
    pub fn is_postgres(&self) -> bool {
        *self == Protocol::Postgres
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Postgres => "postgres",
            Protocol::Tcp => "tcp",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Reads and parses one YAML file, with the position of the first error.
pub fn load_yaml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_yaml(path, &text)
}

pub fn parse_yaml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    serde_norway::from_str(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        // serde_norway appends " at line L column C"; we put the position in front.
        let message = e.to_string();
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_owned();
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            message,
        }
    })
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!("invalid duration {s:?}: {e} (e.g. 10s, 5m)"))
    })
}

/// Writes a duration the way [`duration`] reads it (`1m 30s`), for configs built in code.
fn duration_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// Attaches the file name to a cross-field validation failure.
fn invalid_at(path: &Path, check: Result<(), String>) -> Result<(), ConfigError> {
    check.map_err(|message| ConfigError::Invalid {
        path: path.to_owned(),
        message,
    })
}

fn base_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

fn default_node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown-node".to_owned())
}

// ----------------------------------------------------------------------------------------
// Node agent

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Name recorded in the preamble and audit log (default: `$NODE_NAME`, else hostname).
    #[serde(default = "default_node_name")]
    pub node_name: String,
    #[serde(default = "default_node_admin")]
    pub admin_listen: SocketAddr,
    pub proxy: ProxyEndpoint,
    #[serde(default)]
    pub data_plane: DataPlaneConfig,
    /// Explicit-mode listeners (one identity and route each).
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// Transparent mode: eBPF interception of connections from pods.
    #[serde(default)]
    pub interception: Option<InterceptionConfig>,
}

/// Link-local, reachable from every pod the way node-local DNS is.
pub const DEFAULT_AGENT_ADDRESS: &str = "169.254.77.1:15432";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/db-gateway";
/// How long a connection from a pod the resolver does not know yet waits for it.
pub const DEFAULT_UNKNOWN_POD_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptionConfig {
    /// cgroup v2 directory the programs attach to (default: the cgroup v2 root, found in
    /// /proc/self/mountinfo). Tests attach to a subtree they made.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Where intercepted connections are redirected; the agent listens here.
    #[serde(default = "default_agent_address")]
    pub agent_address: SocketAddr,
    /// Optional IPv6 agent address for native IPv6 destinations.
    #[serde(default)]
    pub agent_address_v6: Option<SocketAddr>,
    /// Interface that holds the agent address(es): a bridge with no ports, created when
    /// the address is not on the node yet (as node-local DNS does), kept across restarts
    /// (pods depend on it), removed by `gateway node uninstall --interface`.
    #[serde(default = "default_agent_interface")]
    pub agent_interface: String,
    /// Destination ports intercepted for every address.
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
    /// Extra `CIDR:port` destinations (e.g. `10.0.0.0/8:6432`, `[fd00::/8]:5432`).
    #[serde(default)]
    pub destinations: Vec<String>,
    /// When the agent is not serving: `false` refuses connects, `true` lets them go direct.
    #[serde(default)]
    pub fail_open: bool,
    /// Original destination → database route; the first match wins.
    pub routes: Vec<RouteConfig>,
    /// Workload identity from the connecting socket's cgroup.
    pub identity: IdentityConfig,
    /// Where the node gets workload certificates.
    pub ca: CaEndpoint,
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_DIR)
}
fn default_agent_address() -> SocketAddr {
    DEFAULT_AGENT_ADDRESS
        .parse()
        .expect("constant address parses")
}
pub const DEFAULT_AGENT_INTERFACE: &str = "dbgw0";

fn default_agent_interface() -> String {
    DEFAULT_AGENT_INTERFACE.to_owned()
}
fn default_ports() -> Vec<u16> {
    vec![5432]
}
fn default_unknown_pod_wait() -> Duration {
    DEFAULT_UNKNOWN_POD_WAIT
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `ip:port`, `CIDR:port` or `*:port` entries.
    pub match_destination: Vec<String>,
    pub route: String,
    /// `tcp` relays the connection as plain bytes (the proxy's route must be `tcp` too).
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    pub trust_domain: String,
    /// Static pod inventory (bare hosts, tests, the demo). Exactly one of `inventory` and
    /// `kubernetes` is set.
    #[serde(default)]
    pub inventory: Option<PathBuf>,
    /// Watch this node's pods on the Kubernetes API (in-cluster service account, or
    /// `$KUBECONFIG`); needs RBAC get/list/watch on pods.
    #[serde(default)]
    pub kubernetes: Option<KubernetesSource>,
    #[serde(
        default = "default_unknown_pod_wait",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub unknown_pod_wait: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSource {
    /// How long start-up waits for the first complete pod list before giving up.
    #[serde(
        default = "default_kube_ready_timeout",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub ready_timeout: Duration,
    /// Identity for processes outside any pod (`None` refuses them).
    #[serde(default)]
    pub host: Option<HostIdentityConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostIdentityConfig {
    pub namespace: String,
    pub service_account: String,
}

fn default_kube_ready_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaEndpoint {
    pub address: SocketAddr,
    pub server_name: String,
    /// CA bundle for the CA service's own certificate.
    pub ca: PathBuf,
    /// The node's certificate (`spiffe://<td>/node/<name>`) and key.
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
}

fn default_node_admin() -> SocketAddr {
    DEFAULT_NODE_ADMIN.parse().expect("constant address parses")
}

fn default_proxy_admin() -> SocketAddr {
    DEFAULT_PROXY_ADMIN
        .parse()
        .expect("constant address parses")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyEndpoint {
    /// `host:port` of the proxy service.
    pub address: String,
    /// Name the proxy's certificate must carry (a DNS SAN).
    pub server_name: String,
    /// CA bundle that signs the proxy's certificate (the workload CA).
    pub ca: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlaneConfig {
    /// io_uring runtimes (one thread each); 0 means one per CPU.
    pub threads: usize,
    /// Longest time a byte may wait to be coalesced with later ones; 0 sends at once.
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub max_flush_delay: Duration,
    /// Bytes buffered per connection and direction before reading from the sender stops.
    pub buffer_budget: usize,
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub connect_timeout: Duration,
    /// How long a client may take to send its startup packet.
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub startup_timeout: Duration,
    /// Pre-handshaked tunnels to the proxy kept ready per workload identity and data-plane
    /// thread, refilled as sessions take them (0 turns the warm pool off). A new session
    /// then skips the TCP and mTLS handshake with the proxy.
    pub warm_tunnels: usize,
    /// A warm tunnel unused this long is closed (an identity that stops connecting keeps
    /// nothing open). Must stay below the proxy's `tunnel_idle_timeout`.
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub warm_tunnel_idle: Duration,
}

pub const DEFAULT_WARM_TUNNELS: usize = 2;
pub const DEFAULT_WARM_TUNNEL_IDLE: Duration = Duration::from_secs(20);
/// How long the proxy waits for the preamble on a handshaked tunnel (the node's warm
/// tunnels wait there).
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const MAX_WARM_TUNNELS: usize = 64;

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            max_flush_delay: Duration::ZERO,
            buffer_budget: DEFAULT_BUFFER_BUDGET,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            warm_tunnels: DEFAULT_WARM_TUNNELS,
            warm_tunnel_idle: DEFAULT_WARM_TUNNEL_IDLE,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub listen: SocketAddr,
    /// Database route: a `databases[].name` of the proxy's policy.
    pub route: String,
    /// `tcp` relays the connection as plain bytes (the proxy's route must be `tcp` too).
    #[serde(default)]
    pub protocol: Protocol,
    /// The workload certificate this listener presents to the proxy.
    pub identity: IdentityFiles,
    /// Pod metadata for the audit log (explicit mode has no kernel to ask).
    #[serde(default)]
    pub pod: PodMeta,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Self = load_yaml(path)?;
        let base = base_dir(path);
        resolve(&base, &mut cfg.proxy.ca);
        for l in &mut cfg.listeners {
            resolve(&base, &mut l.identity.cert);
            resolve(&base, &mut l.identity.key);
        }
        if let Some(i) = &mut cfg.interception {
            if let Some(p) = &mut i.identity.inventory {
                resolve(&base, p);
            }
            resolve(&base, &mut i.ca.ca);
            resolve(&base, &mut i.ca.node_cert);
            resolve(&base, &mut i.ca.node_key);
        }
        let check = cfg.validate();
        invalid_at(path, check).map(|()| cfg)
    }

    /// Cross-field rules, with the setting named in the message.
    pub fn validate(&self) -> Result<(), String> {
        if self.listeners.is_empty() && self.interception.is_none() {
            return Err(
                "listeners: give at least one listener (explicit mode) or an interception section (transparent mode)".into(),
            );
        }
        if let Some(i) = &self.interception {
            if i.routes.is_empty() {
                return Err("interception.routes: at least one route is required".into());
            }
            if i.identity.inventory.is_some() == i.identity.kubernetes.is_some() {
                return Err(
                    "interception.identity: set exactly one of inventory and kubernetes".into(),
                );
            }
            for (n, r) in i.routes.iter().enumerate() {
                for d in &r.match_destination {
                    parse_destination(d)
                        .map_err(|e| format!("interception.routes[{n}].match_destination: {e}"))?;
                }
            }
            for d in &i.destinations {
                parse_destination(d).map_err(|e| format!("interception.destinations: {e}"))?;
            }
        }
        let dp = &self.data_plane;
        if dp.buffer_budget < TLS_RECORD_PAYLOAD {
            return Err(format!(
                "data_plane.buffer_budget: {} is below one TLS record ({TLS_RECORD_PAYLOAD} bytes)",
                dp.buffer_budget
            ));
        }
        if dp.warm_tunnels > MAX_WARM_TUNNELS {
            return Err(format!(
                "data_plane.warm_tunnels: {} is above {MAX_WARM_TUNNELS} per identity and thread",
                dp.warm_tunnels
            ));
        }
        if dp.warm_tunnels > 0 && dp.warm_tunnel_idle.is_zero() {
            return Err(
                "data_plane.warm_tunnel_idle: must be more than 0 (or set warm_tunnels: 0)".into(),
            );
        }
        if dp.max_flush_delay > Duration::from_millis(100) {
            return Err(format!(
                "data_plane.max_flush_delay: {:?} is above 100ms; that would hold queries back",
                dp.max_flush_delay
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for l in &self.listeners {
            // Port 0 asks the kernel for a free port each time, so it never collides.
            if l.listen.port() != 0 && !seen.insert(l.listen) {
                return Err(format!("listeners: address {} is listed twice", l.listen));
            }
        }
        Ok(())
    }
}

/// A destination pattern: address or network (`None` = any) and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination {
    pub net: Option<(std::net::IpAddr, u8)>,
    pub port: u16,
}

impl Destination {
    pub fn matches(&self, dst: SocketAddr) -> bool {
        if dst.port() != self.port {
            return false;
        }
        let Some((net, prefix)) = self.net else {
            return true;
        };
        // IPv4-mapped IPv6 destinations match IPv4 networks.
        let ip = match dst.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(dst.ip()),
            v4 => v4,
        };
        match (net, ip) {
            (std::net::IpAddr::V4(n), std::net::IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (std::net::IpAddr::V6(n), std::net::IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Parses `10.0.3.7:5432`, `10.0.0.0/8:5432`, `[fd00::/8]:5432`, `[::1]:5432`, `*:5432`.
pub fn parse_destination(s: &str) -> Result<Destination, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected ADDRESS:PORT or CIDR:PORT"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{s:?}: bad port {port:?}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host == "*" {
        return Ok(Destination { net: None, port });
    }
    let (addr, prefix) = match host.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (host, None),
    };
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?}: bad address {addr:?}"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: bad prefix length {p:?}"))?,
        None => max,
    };
    Ok(Destination {
        net: Some((ip, prefix)),
        port,
    })
}

// ----------------------------------------------------------------------------------------
// Proxy service

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// Single-threaded runtimes, one per CPU when 0.
    #[serde(default)]
    pub threads: usize,
    #[serde(default = "default_proxy_admin")]
    pub admin_listen: SocketAddr,
    /// Only client certificates with a SPIFFE ID in this trust domain are identities.
    pub trust_domain: String,
    pub tls: ProxyTls,
    pub db_client_ca: CaFiles,
    #[serde(
        default = "default_db_client_ttl",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub db_client_cert_ttl: Duration,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(
        default = "default_drain_grace",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub drain_grace: Duration,
    #[serde(
        default = "default_startup_timeout",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub startup_timeout: Duration,
    /// How long a handshaked tunnel may wait for its preamble: nodes keep warm tunnels
    /// (`data_plane.warm_tunnels`) that send it only when an application connects.
    #[serde(
        default = "default_tunnel_idle_timeout",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub tunnel_idle_timeout: Duration,
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub upstream_connect_timeout: Duration,
    #[serde(default)]
    pub roles: Vec<RoleConfig>,
    pub databases: Vec<DatabaseConfig>,
}

fn default_db_client_ttl() -> Duration {
    DEFAULT_DB_CLIENT_CERT_TTL
}
fn default_drain_grace() -> Duration {
    DEFAULT_DRAIN_GRACE
}
fn default_startup_timeout() -> Duration {
    DEFAULT_STARTUP_TIMEOUT
}
fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_tunnel_idle_timeout() -> Duration {
    DEFAULT_TUNNEL_IDLE_TIMEOUT
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The workload CA: client certificates must chain to it.
    pub client_ca: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// A file (appended to) or `-` for standard output.
    pub path: String,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { path: "-".into() }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Effect {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    pub name: String,
    #[serde(default)]
    pub effect: Effect,
    #[serde(rename = "match")]
    pub matcher: MatchConfig,
    /// Which database routes the role covers.
    pub databases: DatabaseSelector,
    /// Database names (templates allowed; `*` = any). Unused by deny roles.
    #[serde(default)]
    pub db_names: Vec<String>,
    /// Database users (templates allowed). Unused by deny roles.
    #[serde(default)]
    pub db_users: Vec<String>,
    /// Log in as the first `db_users` entry whatever user the client asked for.
    #[serde(default)]
    pub force_db_user: bool,
    /// Connect to the first `db_names` entry whatever database the client asked for.
    #[serde(default)]
    pub force_db_name: bool,
}

/// All given fields must match; an empty matcher is refused at load (it would match all).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    /// Glob over the whole SPIFFE ID (`*` matches any run of characters).
    pub spiffe_id: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSelector {
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl DatabaseSelector {
    /// Whether the selector picks `db`: all given names/labels must match, and an empty
    /// selector picks nothing (deny by default).
    pub fn covers(&self, db: &DatabaseConfig) -> bool {
        (self.names.is_empty() || self.names.iter().any(|n| n == &db.name))
            && self.labels.iter().all(|(k, v)| db.labels.get(k) == Some(v))
            && !(self.names.is_empty() && self.labels.is_empty())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `postgres` (default) or `tcp` (plain L4 relay to `upstream.address`).
    #[serde(default)]
    pub protocol: Protocol,
    pub upstream: UpstreamConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `host:port` of the PostgreSQL server (or of the TCP service of a `tcp` route).
    pub address: String,
    /// Required for `postgres` routes; not allowed on `tcp` routes.
    #[serde(default)]
    pub auth: Option<UpstreamAuth>,
    #[serde(default)]
    pub tls: UpstreamTlsMode,
    /// CA bundle for the server certificate (required for `postgres` routes: there is no
    /// system store to trust; not allowed on `tcp` routes).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Name to verify in the server certificate (default: the host part of `address`).
    pub server_name: Option<String>,
    /// Reuse logged-in server sessions across client sessions (off when absent).
    #[serde(default)]
    pub reuse: Option<ReuseConfig>,
}

/// Server-session reuse: when a client session ends cleanly (Terminate or EOF while the
/// server is idle outside a transaction), the proxy resets the server session with
/// `DISCARD ALL` and keeps it for the next client session with the same database user,
/// database name and startup parameters, instead of logging in again.
///
/// Why: a PostgreSQL login costs a process fork, backend start-up and, for the
/// certificate login, a TLS handshake on a freshly forked backend (OpenSSL's first
/// handshake in a process): about 4.5 ms and most of a connection's CPU on the bench
/// machine, where the proxy's own work is under 1 ms. Off by default: kept sessions count
/// against the server's `max_connections`, and what `DISCARD ALL` does not reset (the
/// unnamed prepared statement, `pg_stat` counters, the backend pid) carries over, as with
/// PgBouncer's session pooling.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReuseConfig {
    /// Idle server sessions kept per (database user, database name, startup parameters)
    /// on each proxy thread.
    #[serde(default = "default_reuse_max_idle")]
    pub max_idle: usize,
    /// An idle kept session is closed after this long without a client.
    #[serde(
        default = "default_reuse_idle_timeout",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub idle_timeout: Duration,
    /// A server session is not reused once it is this old (it logs in again with a fresh
    /// certificate, and role changes on the server take effect).
    #[serde(
        default = "default_reuse_max_lifetime",
        deserialize_with = "duration",
        serialize_with = "duration_text"
    )]
    pub max_lifetime: Duration,
}

pub const MAX_REUSE_IDLE: usize = 1024;

fn default_reuse_max_idle() -> usize {
    4
}
fn default_reuse_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_reuse_max_lifetime() -> Duration {
    Duration::from_secs(10 * 60)
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamAuth {
    /// A short-lived client certificate with CN = database user (`hostssl … cert`).
    Cert,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    /// Chain and host name verified, like libpq's `sslmode=verify-full`.
    #[default]
    VerifyFull,
}

impl UpstreamConfig {
    pub fn server_name(&self) -> &str {
        self.server_name.as_deref().unwrap_or_else(|| {
            self.address
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                .unwrap_or(&self.address)
        })
    }
}

impl ProxyConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Self = load_yaml(path)?;
        let base = base_dir(path);
        resolve(&base, &mut cfg.tls.cert);
        resolve(&base, &mut cfg.tls.key);
        resolve(&base, &mut cfg.tls.client_ca);
        resolve(&base, &mut cfg.db_client_ca.cert);
        resolve(&base, &mut cfg.db_client_ca.key);
        for d in &mut cfg.databases {
            if let Some(ca) = &mut d.upstream.ca {
                resolve(&base, ca);
            }
        }
        if cfg.audit.path != "-" {
            let mut p = PathBuf::from(&cfg.audit.path);
            resolve(&base, &mut p);
            cfg.audit.path = p.to_string_lossy().into_owned();
        }
        let check = cfg.validate();
        invalid_at(path, check).map(|()| cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        for (i, d) in self.databases.iter().enumerate() {
            if !names.insert(d.name.as_str()) {
                return Err(format!("databases: name {:?} is used twice", d.name));
            }
            let u = &d.upstream;
            match d.protocol {
                Protocol::Postgres if u.auth.is_none() => {
                    return Err(format!(
                        "databases[{i}] ({}): upstream.auth is required (auth: cert)",
                        d.name
                    ));
                }
                Protocol::Postgres if u.ca.is_none() => {
                    return Err(format!(
                        "databases[{i}] ({}): upstream.ca is required (the CA bundle of the server's certificate)",
                        d.name
                    ));
                }
                Protocol::Tcp
                    if u.auth.is_some()
                        || u.ca.is_some()
                        || u.server_name.is_some()
                        || u.reuse.is_some() =>
                {
                    return Err(format!(
                        "databases[{i}] ({}): a tcp route relays plain bytes; upstream.auth, upstream.ca, upstream.server_name and upstream.reuse do not apply",
                        d.name
                    ));
                }
                _ => {}
            }
            if let Some(r) = &u.reuse {
                if r.max_idle == 0 || r.max_idle > MAX_REUSE_IDLE {
                    return Err(format!(
                        "databases[{i}] ({}): upstream.reuse.max_idle must be 1 to {MAX_REUSE_IDLE} (leave reuse out to turn it off)",
                        d.name
                    ));
                }
                if r.idle_timeout.is_zero() || r.max_lifetime.is_zero() {
                    return Err(format!(
                        "databases[{i}] ({}): upstream.reuse.idle_timeout and max_lifetime must be more than 0",
                        d.name
                    ));
                }
            }
        }
        for (i, r) in self.roles.iter().enumerate() {
            let m = &r.matcher;
            if m.namespace.is_none() && m.service_account.is_none() && m.spiffe_id.is_none() {
                return Err(format!(
                    "roles[{i}] ({}): match must name a namespace, service_account or spiffe_id",
                    r.name
                ));
            }
            for n in &r.databases.names {
                if !names.contains(n.as_str()) {
                    return Err(format!(
                        "roles[{i}] ({}): databases.names: no database named {n:?}",
                        r.name
                    ));
                }
            }
            // Users and database names only mean something on PostgreSQL routes.
            let covers_postgres = self
                .databases
                .iter()
                .filter(|d| d.protocol.is_postgres())
                .any(|d| r.databases.covers(d));
            if r.effect == Effect::Allow
                && covers_postgres
                && (r.db_users.is_empty() || r.db_names.is_empty())
            {
                return Err(format!(
                    "roles[{i}] ({}): an allow role that covers a postgres route needs db_users and db_names",
                    r.name
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let text = "node_name: a\nproxy:\n  address: 127.0.0.1:1\n  server_name: p\n  ca: ca.crt\n  colour: blue\nlisteners: []\n";
        let err = parse_yaml::<NodeConfig>(Path::new("/etc/gw/node.yaml"), text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/gw/node.yaml:6:"), "{msg}");
        assert!(msg.contains("unknown field `colour`"), "{msg}");
    }

    #[test]
    fn bad_duration_is_reported_with_position() {
        let text = "data_plane:\n  max_flush_delay: soon\nproxy: {address: a, server_name: b, ca: c}\nlisteners: []\n";
        let msg = parse_yaml::<NodeConfig>(Path::new("n.yaml"), text)
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("n.yaml:2:"), "{msg}");
        assert!(msg.contains("invalid duration \"soon\""), "{msg}");
    }

    #[test]
    fn validate_names_the_setting() {
        let text = "proxy: {address: a, server_name: b, ca: c}\nlisteners:\n  - {listen: '127.0.0.1:1', route: r, identity: {cert: c, key: k}}\ndata_plane: {buffer_budget: 100}\n";
        let cfg = parse_yaml::<NodeConfig>(Path::new("n.yaml"), text).unwrap();
        assert!(
            cfg.validate()
                .unwrap_err()
                .starts_with("data_plane.buffer_budget")
        );
    }

    #[test]
    fn interception_needs_exactly_one_pod_source() {
        let base = "proxy: {address: a, server_name: b, ca: c}\ninterception:\n  routes: [{match_destination: ['10.0.0.1:5432'], route: main}]\n  ca: {address: '127.0.0.1:1', server_name: ca, ca: c, node_cert: n, node_key: k}\n";
        for (identity, ok) in [
            ("{trust_domain: td, inventory: inv.yaml}", true),
            ("{trust_domain: td, kubernetes: {ready_timeout: 5s}}", true),
            ("{trust_domain: td}", false),
            ("{trust_domain: td, inventory: i, kubernetes: {}}", false),
        ] {
            let text = format!("{base}  identity: {identity}\n");
            let cfg = parse_yaml::<NodeConfig>(Path::new("n.yaml"), &text).unwrap();
            let r = cfg.validate();
            assert_eq!(r.is_ok(), ok, "{identity}: {r:?}");
            if !ok {
                assert!(
                    r.unwrap_err()
                        .contains("exactly one of inventory and kubernetes")
                );
            }
        }
    }

    #[test]
    fn route_protocols_are_checked_per_kind() {
        let base = "listen: '127.0.0.1:0'\ntrust_domain: td\ntls: {cert: c, key: k, client_ca: ca}\ndb_client_ca: {cert: c, key: k}\n";
        let check = |databases: &str, roles: &str| {
            let text = format!("{base}databases:\n{databases}roles:\n{roles}");
            parse_yaml::<ProxyConfig>(Path::new("p.yaml"), &text)
                .unwrap()
                .validate()
        };
        let pg = "  - {name: main, upstream: {address: 'db:5432', auth: cert, ca: ca}}\n";
        let tcp = "  - {name: echo, protocol: tcp, upstream: {address: 'echo:7'}}\n";
        let tcp_role = "  - {name: r, match: {namespace: a}, databases: {names: [echo]}}\n";
        let pg_role = "  - {name: r, match: {namespace: a}, databases: {names: [main]}}\n";
        // A role over tcp routes only needs no users or database names.
        assert_eq!(check(&format!("{pg}{tcp}"), tcp_role), Ok(()));
        // One over a postgres route still does.
        let e = check(&format!("{pg}{tcp}"), pg_role).unwrap_err();
        assert!(e.contains("needs db_users and db_names"), "{e}");
        let e = check(
            "  - {name: echo, protocol: tcp, upstream: {address: 'echo:7', auth: cert}}\n",
            tcp_role,
        )
        .unwrap_err();
        assert!(
            e.starts_with("databases[0] (echo): a tcp route relays plain bytes"),
            "{e}"
        );
        let e = check(
            "  - {name: main, upstream: {address: 'db:5432', auth: cert}}\n",
            "  []\n",
        )
        .unwrap_err();
        assert!(e.contains("upstream.ca is required"), "{e}");
        let e = check(
            "  - {name: main, upstream: {address: 'db:5432', ca: c}}\n",
            "  []\n",
        )
        .unwrap_err();
        assert!(e.contains("upstream.auth is required"), "{e}");
        let typo =
            format!("{base}databases:\n  - {{name: x, protocol: udp, upstream: {{address: a}}}}\n");
        let e = parse_yaml::<ProxyConfig>(Path::new("p.yaml"), &typo)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("p.yaml:6:") && e.contains("unknown variant `udp`"),
            "{e}"
        );
    }

    #[test]
    fn upstream_reuse_has_defaults_and_bounds() {
        let base = "listen: '127.0.0.1:0'\ntrust_domain: td\ntls: {cert: c, key: k, client_ca: ca}\ndb_client_ca: {cert: c, key: k}\nroles: []\n";
        let parse = |db: &str| {
            parse_yaml::<ProxyConfig>(Path::new("p.yaml"), &format!("{base}databases:\n{db}"))
        };
        let cfg = parse(
            "  - {name: main, upstream: {address: 'db:5432', auth: cert, ca: ca, reuse: {}}}\n",
        )
        .unwrap();
        assert_eq!(cfg.validate(), Ok(()));
        let r = cfg.databases[0].upstream.reuse.as_ref().unwrap();
        assert_eq!(
            (r.max_idle, r.idle_timeout, r.max_lifetime),
            (4, Duration::from_secs(60), Duration::from_secs(600))
        );
        // Absent means off.
        let off = parse("  - {name: main, upstream: {address: 'db:5432', auth: cert, ca: ca}}\n")
            .unwrap();
        assert!(off.databases[0].upstream.reuse.is_none());
        let e = parse("  - {name: main, upstream: {address: 'db:5432', auth: cert, ca: ca, reuse: {max_idle: 0}}}\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            e.contains("upstream.reuse.max_idle must be 1 to 1024"),
            "{e}"
        );
        let e = parse("  - {name: echo, protocol: tcp, upstream: {address: 'e:7', reuse: {}}}\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.contains("upstream.reuse do not apply"), "{e}");
        let e = parse("  - {name: main, upstream: {address: 'db:5432', auth: cert, ca: ca, reuse: {idle: 3}}}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `idle`"), "{e}");
    }

    #[test]
    fn destinations_parse_and_match() {
        let d = parse_destination("10.0.0.0/8:5432").unwrap();
        assert!(d.matches("10.1.2.3:5432".parse().unwrap()));
        assert!(d.matches("[::ffff:10.1.2.3]:5432".parse().unwrap()));
        assert!(!d.matches("10.1.2.3:5433".parse().unwrap()));
        assert!(!d.matches("11.1.2.3:5432".parse().unwrap()));
        let one = parse_destination("10.0.3.7:5432").unwrap();
        assert!(one.matches("10.0.3.7:5432".parse().unwrap()));
        assert!(!one.matches("10.0.3.8:5432".parse().unwrap()));
        let v6 = parse_destination("[fd00::/8]:5432").unwrap();
        assert!(v6.matches("[fd12::1]:5432".parse().unwrap()));
        assert!(
            parse_destination("*:5432")
                .unwrap()
                .matches("[::1]:5432".parse().unwrap())
        );
        for bad in ["10.0.0.0/33:5432", "nonsense", "10.0.0.1:port", "host:5432"] {
            assert!(parse_destination(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upstream_server_name_defaults_to_host() {
        let u = UpstreamConfig {
            address: "db.example.com:5432".into(),
            auth: Some(UpstreamAuth::Cert),
            tls: UpstreamTlsMode::VerifyFull,
            ca: Some(PathBuf::from("ca")),
            server_name: None,
            reuse: None,
        };
        assert_eq!(u.server_name(), "db.example.com");
    }
}
