//! Every setting in one place: the YAML files of `gateway node` ([`NodeConfig`], in
//! `config/node.rs`) and `gateway proxy` ([`ProxyConfig`], in `config/proxy.rs`), with their
//! defaults as named constants here.
//!
//! Unknown fields are errors (a typo must not silently fall back to a default), and every
//! error names the file, line, column and field. Relative paths inside a file are relative
//! to that file, so a config directory can be moved as a whole. Each file has one
//! `validate` for its cross-field rules.
//!
//! Ground floor: settings only. Imports the vocabulary the settings are written in (`route`,
//! `pod`), the size of a TLS record (`tunnel`) and the eBPF loader's defaults (`ebpf`).

mod node;
mod proxy;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

pub use node::{
    CaEndpoint, ClientTlsConfig, DataPlaneConfig, IdentityConfig, IdentityFiles,
    InterceptionConfig, JoinConfig, KubernetesSource, ListenerConfig, NodeConfig, ProxyEndpoint,
    RouteConfig,
};
pub use proxy::{
    AuditConfig, AuditWhenFull, CaFiles, CreateDbUserMode, DatabaseConfig, DatabaseSelector,
    Effect, MatchConfig, ProxyConfig, ProxyTls, ReuseConfig, RoleConfig, UpstreamAuth,
    UpstreamConfig, UpstreamTlsMode,
};

// ----------------------------------------------------------------------------------------
// Defaults and bounds of the node agent (`gateway node`)

/// Default address of the admin endpoints (`/metrics`, `/healthz`, `/readyz`).
pub const DEFAULT_NODE_ADMIN: &str = "127.0.0.1:9101";
/// Name recorded in the preamble when neither `$NODE_NAME` nor the hostname is known.
pub const FALLBACK_NODE_NAME: &str = "unknown-node";
/// Link-local, reachable from every pod the way node-local DNS is.
pub const DEFAULT_AGENT_ADDRESS: &str = "169.254.77.1:15432";
pub const DEFAULT_AGENT_INTERFACE: &str = "dbgw0";
/// Where the interception's programs, maps and links are pinned (`--bpf-pin-dir`), and the
/// destination port intercepted for every address (PostgreSQL's): the eBPF loader's own
/// defaults, so that the loader and the settings cannot disagree.
pub use crate::ebpf::{DEFAULT_PIN_DIR, DEFAULT_PORT as DEFAULT_INTERCEPT_PORT};
/// How long a connection from a pod the resolver does not know yet waits for it.
pub const DEFAULT_UNKNOWN_POD_WAIT: Duration = Duration::from_secs(2);
/// Where the kubelet puts pods, as `/proc/<pid>/cgroup` shows them: the systemd driver's
/// `/kubepods.slice` and the cgroupfs driver's `/kubepods`. A pod segment anywhere else is an
/// imitation (issue 18 item 1); nodes whose kubelet has another `--cgroup-root` (kind:
/// `/kubelet.slice/kubelet-kubepods.slice`) list theirs.
pub const DEFAULT_KUBELET_CGROUP_ROOTS: &[&str] = &["/kubepods.slice", "/kubepods"];
/// Shortest time between two walks of the cgroup tree for ids not seen yet: a flood of
/// connects from short-lived cgroups costs at most one walk per interval.
pub const DEFAULT_CGROUP_WALK_INTERVAL: Duration = Duration::from_millis(100);
/// Longer than this, the first connection of a new pod would wait for the walk noticeably.
pub const MAX_CGROUP_WALK_INTERVAL: Duration = Duration::from_secs(2);
/// How long the node waits for one answer of the CA service before the request fails (the
/// connections waiting for it are refused, a renewal retries).
pub const DEFAULT_CA_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries of each kernel connection map, and the open intercepted connections one cgroup may
/// hold: the eBPF loader's own defaults (see there why), so the two cannot disagree.
pub use crate::ebpf::{DEFAULT_CONNECTIONS_PER_CGROUP, DEFAULT_MAX_CONNECTIONS};
/// Bounds of `max_connections`: below this a node of busy pods runs out at once; above, the
/// maps' kernel memory (about 100 bytes an entry, two maps) grows past 800 MiB.
pub const MIN_MAX_CONNECTIONS: u32 = 1024;
pub const MAX_MAX_CONNECTIONS: u32 = 1 << 22;
/// How long start-up waits for the first complete pod list from the Kubernetes API.
pub const DEFAULT_KUBE_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// PostgreSQL's own `authentication_timeout` default is 60 s; a gateway that holds a slot
/// per half-open client wants less.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Per connection and direction: bytes read but not yet written stay under this.
pub const DEFAULT_BUFFER_BUDGET: usize = 64 * 1024;
pub const DEFAULT_WARM_TUNNELS: usize = 2;
/// Application connections one node agent holds at once (`data_plane.max_connections`).
pub const DEFAULT_NODE_MAX_CONNECTIONS: usize = 16_384;
pub const DEFAULT_WARM_TUNNEL_IDLE: Duration = Duration::from_secs(20);
pub const MAX_WARM_TUNNELS: usize = 64;
/// Longer than this, coalescing would hold queries back noticeably.
pub const MAX_FLUSH_DELAY: Duration = Duration::from_millis(100);

// ----------------------------------------------------------------------------------------
// Defaults and bounds of the proxy service (`gateway proxy`)

pub const DEFAULT_PROXY_ADMIN: &str = "127.0.0.1:9102";
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);
/// Short enough that a leaked key is soon useless, long enough that one signature serves
/// a burst of logins (the issuer reuses a certificate for half its life).
pub const DEFAULT_DB_CLIENT_CERT_TTL: Duration = Duration::from_secs(10 * 60);
/// How long the proxy waits for the preamble on a handshaked tunnel (the node's warm
/// tunnels wait there).
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The audit log goes to standard output unless a file is named.
pub const DEFAULT_AUDIT_PATH: &str = "-";
/// Audit records queued for the writer thread at most: about 40 MB of lines at ~600 bytes,
/// seconds of a busy proxy's sessions.
pub const DEFAULT_AUDIT_QUEUE: usize = 65_536;
/// Bounds of `audit.queue`.
pub const MAX_AUDIT_QUEUE: usize = 1 << 22;
/// Idle kept server sessions per key and proxy thread, when reuse is on.
pub const DEFAULT_REUSE_MAX_IDLE: usize = 4;
pub const DEFAULT_REUSE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_REUSE_MAX_LIFETIME: Duration = Duration::from_secs(10 * 60);
pub const MAX_REUSE_IDLE: usize = 1024;
/// Startup parameters that change who a session is (or open a walsender): never forwarded,
/// and a route's `upstream.startup_parameters` may not list them.
pub const PRIVILEGED_STARTUP_PARAMETERS: &[&str] = &[
    "role",
    "session_authorization",
    "replication",
    "is_superuser",
];
/// A node's TLS handshake with the proxy takes milliseconds (one round trip and two
/// signatures, or a resumption); a peer that has not finished after this is not a node
/// worth a task, and before this limit a certificate-less peer could hold one for
/// `startup_timeout`.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole upstream login (TCP connect, `SSLRequest` answer, TLS, startup reads), not
/// only the connect: a server that accepts and then stays silent must not hold a session
/// (or a drain) forever. PostgreSQL's own `authentication_timeout` is 60 s; a login by
/// certificate takes milliseconds.
pub const DEFAULT_UPSTREAM_LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one proxy process holds (tunnels in their handshake, waiting for a
/// preamble, or in a session), all threads together. Each costs two descriptors and its
/// TLS state; past the cap a new TCP connection is closed at once, so memory stays bounded
/// whatever peers do. Well above what a node fleet's warm tunnels and sessions need.
pub const DEFAULT_PROXY_MAX_CONNECTIONS: usize = 16_384;
/// Sessions one workload identity may hold at once, per proxy process: a runaway or
/// hostile workload exhausts its own allowance, not the database's `max_connections`
/// for everyone.
pub const DEFAULT_MAX_SESSIONS_PER_IDENTITY: usize = 512;
/// Sessions one database route may hold at once, per proxy process: what the proxy
/// lets through to one database server.
pub const DEFAULT_MAX_SESSIONS_PER_ROUTE: usize = 2048;

/// The port in an RDS IAM token when `address` names none (PostgreSQL's).
pub const DEFAULT_RDS_PORT: u16 = 5432;
/// RDS accepts an IAM token for 15 minutes after it was signed (`X-Amz-Expires`), the
/// value of the AWS SDKs' `generate_db_auth_token`.
pub const RDS_TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// A cached token (or the AWS credentials behind it) is replaced this long before it
/// expires, or at half its remaining life when that is shorter: a login that starts with
/// a token must not meet its expiry on the way (slow TLS, a retrying client).
pub const RDS_TOKEN_REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// How long the proxy waits for AWS credentials (STS, the container or instance endpoint)
/// before the sessions waiting for a token are refused.
pub const AWS_CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed attempt the chain is not asked again for this long: sessions meanwhile get
/// the last unexpired credentials, or the same error at once.
pub const AWS_CREDENTIALS_RETRY_AFTER: Duration = Duration::from_secs(5);

// ----------------------------------------------------------------------------------------
// Reading files

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

/// Durations in configuration files are text (`10s`, `5m`, `1m 30s`): fields take
/// `#[serde(with = "human_duration")]`, which reads them and writes them back the same way
/// (configs built in code, such as the harness's, are serialized).
mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("invalid duration {s:?}: {e} (e.g. 10s, 5m)"))
        })
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

/// A kubelet cgroup root: an absolute cgroup path of at least one segment, with no empty,
/// `.` or `..` segment (it is compared segment by segment, never resolved).
pub fn check_cgroup_root(root: &str) -> Result<(), String> {
    let Some(rest) = root.strip_prefix('/') else {
        return Err(format!("{root:?} is not an absolute cgroup path"));
    };
    if rest.is_empty() {
        return Err(
            "\"/\" would make every cgroup a kubelet cgroup (anyone could imitate a pod)".into(),
        );
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(format!("{root:?} has an empty, \".\" or \"..\" segment"));
    }
    Ok(())
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
        .unwrap_or_else(|| FALLBACK_NODE_NAME.to_owned())
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
}
