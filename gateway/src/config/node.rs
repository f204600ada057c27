//! The node agent's file (`gateway node --config`): explicit listeners, transparent
//! interception, the data plane's knobs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;
use crate::pod::{HostIdentity, PodMeta};
use crate::route::{Protocol, parse_destination};
use crate::tunnel::TLS_RECORD_PAYLOAD;

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
    /// Entries of each kernel connection map (intercepted connections not closed yet, all
    /// pods together). Set at load; a pinned installation of another size must be removed
    /// (`gateway node uninstall`) before it changes.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Intercepted connections one cgroup (a container) may have open; its next connect
    /// fails with EPERM, counted in `gateway_node_intercept_refusals_total`. Without such a
    /// budget one pod's connects would evict the other pods' records (issue 18 item 10).
    #[serde(default = "default_connections_per_cgroup")]
    pub connections_per_cgroup: u32,
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
fn default_agent_interface() -> String {
    DEFAULT_AGENT_INTERFACE.to_owned()
}
fn default_ports() -> Vec<u16> {
    vec![DEFAULT_INTERCEPT_PORT]
}
fn default_unknown_pod_wait() -> Duration {
    DEFAULT_UNKNOWN_POD_WAIT
}
fn default_max_connections() -> u32 {
    DEFAULT_MAX_CONNECTIONS
}
fn default_connections_per_cgroup() -> u32 {
    DEFAULT_CONNECTIONS_PER_CGROUP
}
fn default_kubelet_cgroup_roots() -> Vec<String> {
    DEFAULT_KUBELET_CGROUP_ROOTS
        .iter()
        .map(|r| (*r).to_owned())
        .collect()
}
fn default_cgroup_walk_interval() -> Duration {
    DEFAULT_CGROUP_WALK_INTERVAL
}
fn default_ca_timeout() -> Duration {
    DEFAULT_CA_TIMEOUT
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
    /// TLS between the application and the node (`postgres` routes; on by default).
    #[serde(default, skip_serializing_if = "ClientTlsConfig::is_default")]
    pub client_tls: ClientTlsConfig,
}

/// A transparent route's client TLS: `SSLRequest` answered `S` and the application's TLS
/// terminated at the node with a certificate from the CA for the dialled IP and
/// `server_names`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTlsConfig {
    /// `false` answers `SSLRequest` with `N`, as a server without TLS does.
    pub enabled: bool,
    /// DNS names the route's certificate carries besides the dialled IP: the names the
    /// applications' connection strings use (libpq's SNI and `verify-full` check them).
    /// The CA must allow each (`gateway ca serve --server-names`).
    pub server_names: Vec<String>,
}

impl Default for ClientTlsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            server_names: Vec::new(),
        }
    }
}

impl ClientTlsConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
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
    #[serde(default = "default_unknown_pod_wait", with = "human_duration")]
    pub unknown_pod_wait: Duration,
    /// The kubelet's cgroup roots (its `--cgroup-root` with the driver's `kubepods` part),
    /// as `/proc/<pid>/cgroup` shows them. Pod segments count only directly under one of
    /// them (or its QoS cgroup) and through directories owned by root: a user with a
    /// delegated cgroup subtree could otherwise build any pod's path and take its identity.
    #[serde(default = "default_kubelet_cgroup_roots")]
    pub kubelet_cgroup_roots: Vec<String>,
    /// Shortest time between two walks of the cgroup tree for cgroup ids not seen yet.
    #[serde(default = "default_cgroup_walk_interval", with = "human_duration")]
    pub cgroup_walk_interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSource {
    /// How long start-up waits for the first complete pod list before giving up.
    #[serde(default = "default_kube_ready_timeout", with = "human_duration")]
    pub ready_timeout: Duration,
    /// Identity for processes outside any pod (`None` refuses them).
    #[serde(default)]
    pub host: Option<HostIdentity>,
}

fn default_kube_ready_timeout() -> Duration {
    DEFAULT_KUBE_READY_TIMEOUT
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaEndpoint {
    /// `host:port` of the CA service: an IP, or a name (a Service's DNS name) looked up at
    /// every connection, so a Service that is recreated with another IP is followed.
    pub address: String,
    pub server_name: String,
    /// CA bundle for the CA service's own certificate.
    pub ca: PathBuf,
    /// The node's certificate (`spiffe://<td>/node/<name>`) and key, from files; or
    /// `join` instead.
    #[serde(default)]
    pub node_cert: PathBuf,
    #[serde(default)]
    pub node_key: PathBuf,
    /// Join the CA for the node certificate (key in memory only, renewed at half-life)
    /// instead of `node_cert`/`node_key`.
    #[serde(default)]
    pub join: Option<JoinConfig>,
    /// How long one certificate request may take (connect, TLS, answer); past it the
    /// request fails, so a stuck CA never holds connections longer than this.
    #[serde(default = "default_ca_timeout", with = "human_duration")]
    pub timeout: Duration,
}

/// How the node proves itself to the CA's join listener (`gateway ca serve --join-listen`);
/// the CA's name and bundle are `interception.ca`'s.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case", deny_unknown_fields)]
pub enum JoinConfig {
    /// A `gateway ca token create` token in a file.
    Token {
        address: String,
        token_file: PathBuf,
    },
    /// The agent's projected service-account token (made for the CA's audience).
    Kubernetes {
        address: String,
        #[serde(default = "default_sa_token_file")]
        token_file: PathBuf,
    },
    /// An STS `GetCallerIdentity` request signed with the node's AWS credentials.
    AwsIam {
        address: String,
        region: String,
        /// Default: the region's STS endpoint.
        #[serde(default)]
        sts_endpoint: Option<String>,
    },
}

impl JoinConfig {
    /// `host:port` of the CA's join listener (a name is looked up at every connection).
    pub fn address(&self) -> &str {
        match self {
            JoinConfig::Token { address, .. }
            | JoinConfig::Kubernetes { address, .. }
            | JoinConfig::AwsIam { address, .. } => address,
        }
    }
}

fn default_sa_token_file() -> PathBuf {
    PathBuf::from("/var/run/secrets/tokens/gateway-ca")
}

fn default_node_admin() -> SocketAddr {
    DEFAULT_NODE_ADMIN.parse().expect("constant address parses")
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
    /// Each proxy replica's own `host:port`, in the order of their `replica_index`, when
    /// `address` is a service in front of several: a cancel request goes to the replica
    /// its key names (the one carrying its session), not through `address`. Empty: every
    /// connection goes to `address`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlaneConfig {
    /// io_uring runtimes (one thread each); 0 means one per CPU.
    pub threads: usize,
    /// Longest time a byte may wait to be coalesced with later ones; 0 sends at once.
    #[serde(with = "human_duration")]
    pub max_flush_delay: Duration,
    /// Bytes buffered per connection and direction before reading from the sender stops.
    pub buffer_budget: usize,
    #[serde(with = "human_duration")]
    pub connect_timeout: Duration,
    /// How long a client may take to send its startup packet.
    #[serde(with = "human_duration")]
    pub startup_timeout: Duration,
    /// Pre-handshaked tunnels to the proxy kept ready per workload identity and data-plane
    /// thread, refilled as sessions take them (0 turns the warm pool off). A new session
    /// then skips the TCP and mTLS handshake with the proxy.
    pub warm_tunnels: usize,
    /// A warm tunnel unused this long is closed (an identity that stops connecting keeps
    /// nothing open). Must stay below the proxy's `tunnel_idle_timeout`.
    #[serde(with = "human_duration")]
    pub warm_tunnel_idle: Duration,
    /// Application connections the agent holds at once, all threads together; past it a new
    /// connection is closed at accept and counted. Each costs two sockets and up to twice
    /// `buffer_budget`: the cap bounds the agent's memory whatever the pods do.
    pub max_connections: usize,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            threads: 0,
            max_flush_delay: Duration::ZERO,
            buffer_budget: DEFAULT_BUFFER_BUDGET,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            warm_tunnels: DEFAULT_WARM_TUNNELS,
            max_connections: DEFAULT_NODE_MAX_CONNECTIONS,
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
    /// Bind `listen` outside loopback. An explicit listener lends its workload identity to
    /// whoever can connect (there is no kernel identity to check), so by default it may only
    /// listen on a loopback address, reachable from its own network namespace only. Set this
    /// when the listener runs inside the workload's pod and binds an address only that pod
    /// can reach, or when the network in front of it is the access control.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expose: bool,
    /// The server certificate (and key) the listener presents to applications that ask
    /// for TLS (`SSLRequest`, or PostgreSQL 17's direct TLS); without it `SSLRequest` is
    /// answered `N`. It should name the address the applications dial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_tls: Option<IdentityFiles>,
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
            if let Some(t) = &mut l.client_tls {
                resolve(&base, &mut t.cert);
                resolve(&base, &mut t.key);
            }
        }
        if let Some(i) = &mut cfg.interception {
            if let Some(p) = &mut i.identity.inventory {
                resolve(&base, p);
            }
            resolve(&base, &mut i.ca.ca);
            if !i.ca.node_cert.as_os_str().is_empty() {
                resolve(&base, &mut i.ca.node_cert);
                resolve(&base, &mut i.ca.node_key);
            }
            match &mut i.ca.join {
                Some(JoinConfig::Token { token_file, .. })
                | Some(JoinConfig::Kubernetes { token_file, .. }) => resolve(&base, token_file),
                _ => {}
            }
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
                for name in &r.client_tls.server_names {
                    if rustls_pki_types::DnsName::try_from(name.as_str()).is_err()
                        || name.parse::<std::net::IpAddr>().is_ok()
                    {
                        return Err(format!(
                            "interception.routes[{n}].client_tls.server_names: {name:?} is not a DNS name (the dialled IP is always in the certificate)"
                        ));
                    }
                }
            }
            for d in &i.destinations {
                parse_destination(d).map_err(|e| format!("interception.destinations: {e}"))?;
            }
            validate_interception(i)?;
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
        if dp.max_connections == 0 {
            return Err("data_plane.max_connections: must be at least 1".into());
        }
        if dp.max_flush_delay > MAX_FLUSH_DELAY {
            return Err(format!(
                "data_plane.max_flush_delay: {:?} is above {MAX_FLUSH_DELAY:?}; that would hold queries back",
                dp.max_flush_delay
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for l in &self.listeners {
            // Port 0 asks the kernel for a free port each time, so it never collides.
            if l.listen.port() != 0 && !seen.insert(l.listen) {
                return Err(format!("listeners: address {} is listed twice", l.listen));
            }
            if !l.listen.ip().is_loopback() && !l.expose {
                return Err(format!(
                    "listeners: {} is not a loopback address: anyone who can reach it would connect as the listener's identity ({}). Listen on 127.0.0.1, or set `expose: true` on the listener if only the workload can reach that address",
                    l.listen,
                    l.identity.cert.display()
                ));
            }
        }
        Ok(())
    }
}

/// `host:port` with a port, an IP (`[v6]` in brackets) or a DNS name; not looked up here
/// (`gateway config check` runs where cluster names do not resolve).
fn check_host_port(address: &str) -> Result<(), String> {
    if address.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = || {
        format!(
            "{address:?} is not host:port (an IP, or a DNS name such as gateway-ca.db-gateway.svc:7444)"
        )
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    match port.parse::<u16>() {
        Ok(p) if p > 0 && name_ok => Ok(()),
        _ => Err(bad()),
    }
}

/// The hardening settings of `interception` (issue 18 items 1, 9, 10).
fn validate_interception(i: &InterceptionConfig) -> Result<(), String> {
    if i.identity.kubelet_cgroup_roots.is_empty() {
        return Err(
            "interception.identity.kubelet_cgroup_roots: give at least one (no process could be a pod's)".into(),
        );
    }
    for r in &i.identity.kubelet_cgroup_roots {
        check_cgroup_root(r)
            .map_err(|e| format!("interception.identity.kubelet_cgroup_roots: {e}"))?;
    }
    if i.identity.cgroup_walk_interval > MAX_CGROUP_WALK_INTERVAL {
        return Err(format!(
            "interception.identity.cgroup_walk_interval: {:?} is above {MAX_CGROUP_WALK_INTERVAL:?}; a new pod's first connection waits for the walk",
            i.identity.cgroup_walk_interval
        ));
    }
    let files = !i.ca.node_cert.as_os_str().is_empty() || !i.ca.node_key.as_os_str().is_empty();
    if files == i.ca.join.is_some() {
        return Err(
            "interception.ca: give either node_cert and node_key, or join (not both)".into(),
        );
    }
    if i.ca.timeout.is_zero() {
        return Err("interception.ca.timeout: must be more than 0".into());
    }
    check_host_port(&i.ca.address).map_err(|e| format!("interception.ca.address: {e}"))?;
    if let Some(join) = &i.ca.join {
        check_host_port(join.address())
            .map_err(|e| format!("interception.ca.join.address: {e}"))?;
    }
    if !(MIN_MAX_CONNECTIONS..=MAX_MAX_CONNECTIONS).contains(&i.max_connections) {
        return Err(format!(
            "interception.max_connections: {} is outside {MIN_MAX_CONNECTIONS}..={MAX_MAX_CONNECTIONS}",
            i.max_connections
        ));
    }
    if i.connections_per_cgroup == 0 || i.connections_per_cgroup > i.max_connections {
        return Err(format!(
            "interception.connections_per_cgroup: {} must be between 1 and max_connections ({})",
            i.connections_per_cgroup, i.max_connections
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn hardening_05_explicit_listener_binds_loopback_unless_exposed() {
        let text = |listen: &str, extra: &str| {
            format!(
                "proxy: {{address: a, server_name: b, ca: c}}\nlisteners:\n  - {{listen: '{listen}', route: r, identity: {{cert: w.crt, key: k}}{extra}}}\n"
            )
        };
        let check = |t: String| {
            parse_yaml::<NodeConfig>(Path::new("n.yaml"), &t)
                .unwrap()
                .validate()
        };
        for ok in ["127.0.0.1:5432", "127.0.0.2:0", "[::1]:5432"] {
            assert_eq!(check(text(ok, "")), Ok(()), "{ok}");
        }
        for bad in [
            "0.0.0.0:5432",
            "10.1.2.3:5432",
            "[::]:5432",
            "169.254.77.1:15432",
        ] {
            let e = check(text(bad, "")).unwrap_err();
            assert!(e.contains("is not a loopback address"), "{bad}: {e}");
            assert!(e.contains("w.crt") && e.contains("expose: true"), "{e}");
            assert_eq!(check(text(bad, ", expose: true")), Ok(()), "{bad}");
        }
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
    fn hardening_settings_are_validated() {
        let base = "proxy: {address: a, server_name: b, ca: c}\ninterception:\n  routes: [{match_destination: ['10.0.0.1:5432'], route: main}]\n";
        for (extra, identity, ca, want) in [
            ("", "", "", None),
            (
                "",
                "kubelet_cgroup_roots: []",
                "",
                Some("kubelet_cgroup_roots"),
            ),
            (
                "",
                "kubelet_cgroup_roots: ['/']",
                "",
                Some("kubelet_cgroup_roots"),
            ),
            (
                "",
                "kubelet_cgroup_roots: [kubepods]",
                "",
                Some("not an absolute"),
            ),
            (
                "",
                "cgroup_walk_interval: 1m",
                "",
                Some("cgroup_walk_interval"),
            ),
            ("", "", "timeout: 0s", Some("interception.ca.timeout")),
            ("  max_connections: 10\n", "", "", Some("max_connections")),
            (
                "  connections_per_cgroup: 0\n",
                "",
                "",
                Some("connections_per_cgroup"),
            ),
            (
                "  max_connections: 2048\n  connections_per_cgroup: 4096\n",
                "",
                "",
                Some("connections_per_cgroup"),
            ),
        ] {
            let sep = |s: &str| {
                if s.is_empty() {
                    String::new()
                } else {
                    format!(", {s}")
                }
            };
            let text = format!(
                "{base}{extra}  identity: {{trust_domain: td, inventory: i{}}}\n  ca: {{address: '127.0.0.1:1', server_name: ca, ca: c, node_cert: n, node_key: k{}}}\n",
                sep(identity),
                sep(ca)
            );
            let cfg = parse_yaml::<NodeConfig>(Path::new("n.yaml"), &text).unwrap();
            match (cfg.validate(), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => assert!(e.contains(w), "{text}: {e}"),
                (r, w) => panic!("{text}: {r:?}, wanted {w:?}"),
            }
        }
    }

    #[test]
    fn the_ca_address_is_an_ip_or_a_name_with_a_port() {
        for good in [
            "10.100.77.44:7444",
            "[fd00::1]:7444",
            "gateway-ca.db-gateway.svc:7444",
            "gateway-ca.db-gateway.svc.cluster.local:7445",
        ] {
            assert_eq!(check_host_port(good), Ok(()), "{good}");
        }
        for bad in [
            "gateway-ca.db-gateway.svc",
            "gateway-ca:0",
            ":7444",
            "https://gateway-ca:7444",
            "gateway ca:7444",
            "a..b:1",
        ] {
            let e = check_host_port(bad).unwrap_err();
            assert!(e.contains("is not host:port"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_node_certificate_comes_from_files_or_a_join_not_both() {
        let base = "proxy: {address: a, server_name: b, ca: c}\ninterception:\n  routes: [{match_destination: ['10.0.0.1:5432'], route: main}]\n  identity: {trust_domain: td, inventory: i}\n";
        let check = |ca: &str| {
            parse_yaml::<NodeConfig>(
                Path::new("n.yaml"),
                &format!("{base}  ca: {{address: '127.0.0.1:1', server_name: ca, ca: c{ca}}}\n"),
            )
            .map_err(|e| e.to_string())
            .and_then(|c| c.validate())
        };
        assert_eq!(check(", node_cert: n, node_key: k"), Ok(()));
        assert_eq!(
            check(", join: {method: token, address: '127.0.0.1:2', token_file: t}"),
            Ok(())
        );
        assert_eq!(
            check(", join: {method: kubernetes, address: '127.0.0.1:2'}"),
            Ok(())
        );
        assert_eq!(
            check(", join: {method: aws-iam, address: '127.0.0.1:2', region: eu-west-1}"),
            Ok(())
        );
        for bad in [
            "",
            ", node_cert: n, node_key: k, join: {method: token, address: '127.0.0.1:2', token_file: t}",
        ] {
            let e = check(bad).unwrap_err();
            assert!(
                e.contains("either node_cert and node_key, or join"),
                "{bad}: {e}"
            );
        }
        let e = check(", join: {method: token, address: '127.0.0.1:2'}").unwrap_err();
        assert!(e.contains("token_file"), "{e}");
        let e = check(", join: {method: psk, address: '127.0.0.1:2'}").unwrap_err();
        assert!(e.contains("psk"), "{e}");
    }
}
