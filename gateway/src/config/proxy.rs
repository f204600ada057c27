//! The proxy service's file (`gateway proxy --config`): its TLS, the database routes and the
//! roles of the policy over them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;
use crate::route::Protocol;

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
    #[serde(default = "default_db_client_ttl", with = "human_duration")]
    pub db_client_cert_ttl: Duration,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default = "default_drain_grace", with = "human_duration")]
    pub drain_grace: Duration,
    #[serde(default = "default_startup_timeout", with = "human_duration")]
    pub startup_timeout: Duration,
    /// How long a handshaked tunnel may wait for its preamble: nodes keep warm tunnels
    /// (`data_plane.warm_tunnels`) that send it only when an application connects.
    #[serde(default = "default_tunnel_idle_timeout", with = "human_duration")]
    pub tunnel_idle_timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "human_duration")]
    pub upstream_connect_timeout: Duration,
    /// The TLS handshake with a node, from the accepted TCP connection.
    #[serde(default = "default_tls_handshake_timeout", with = "human_duration")]
    pub tls_handshake_timeout: Duration,
    /// The whole upstream login, connect included (≥ `upstream_connect_timeout`).
    #[serde(default = "default_upstream_login_timeout", with = "human_duration")]
    pub upstream_login_timeout: Duration,
    /// Connections this process holds at once, all threads; more are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Sessions one workload identity may hold at once in this process (`53300` past it).
    #[serde(default = "default_max_sessions_per_identity")]
    pub max_sessions_per_identity: usize,
    /// Sessions one database route may hold at once in this process (`53300` past it).
    #[serde(default = "default_max_sessions_per_route")]
    pub max_sessions_per_route: usize,
    /// This replica's index among the proxy replicas behind one service address (0 to
    /// 255; e.g. a StatefulSet's pod index), written into the cancel keys it issues so that
    /// nodes listing the replicas in `proxy.replicas` send each cancel to the replica that
    /// carries its session. Leave out with a single replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_index: Option<u8>,
    #[serde(default)]
    pub roles: Vec<RoleConfig>,
    pub databases: Vec<DatabaseConfig>,
}

fn default_proxy_admin() -> SocketAddr {
    DEFAULT_PROXY_ADMIN
        .parse()
        .expect("constant address parses")
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
fn default_tls_handshake_timeout() -> Duration {
    DEFAULT_TLS_HANDSHAKE_TIMEOUT
}
fn default_upstream_login_timeout() -> Duration {
    DEFAULT_UPSTREAM_LOGIN_TIMEOUT
}
fn default_max_connections() -> usize {
    DEFAULT_PROXY_MAX_CONNECTIONS
}
fn default_max_sessions_per_identity() -> usize {
    DEFAULT_MAX_SESSIONS_PER_IDENTITY
}
fn default_max_sessions_per_route() -> usize {
    DEFAULT_MAX_SESSIONS_PER_ROUTE
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
    /// Records waiting for the writer thread, at most.
    #[serde(default = "default_audit_queue")]
    pub queue: usize,
    /// What happens when the queue is full (the sink is stalled).
    #[serde(default)]
    pub when_full: AuditWhenFull,
}

fn default_audit_queue() -> usize {
    DEFAULT_AUDIT_QUEUE
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: DEFAULT_AUDIT_PATH.into(),
            queue: DEFAULT_AUDIT_QUEUE,
            when_full: AuditWhenFull::default(),
        }
    }
}

/// The audit queue's policy when its sink stalls. Records already owed (the end of a
/// session that started) are never dropped under either.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditWhenFull {
    /// New sessions get `53000` while the queue is more than half full; sessions already
    /// running go on. The default: a stalled sink then stops new, unrecorded access without
    /// stalling the proxy.
    #[default]
    RefuseNewSessions,
    /// Every session waits until its record fits, new and running alike (the whole proxy
    /// stalls with the sink).
    Block,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Effect {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// Automatic database users: create the decided user when it does not exist (as the
    /// route's `upstream.admin_user`), and what to do after its last session.
    #[serde(default, skip_serializing_if = "CreateDbUserMode::is_off")]
    pub create_db_user_mode: CreateDbUserMode,
    /// Roles granted to an automatic user (templates allowed), kept in step with the policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub db_roles: Vec<String>,
}

/// What the proxy does with a database user that does not exist (`create_db_user_mode`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CreateDbUserMode {
    /// Never create or change users (the default).
    #[default]
    Off,
    /// Create it; after its last session revoke its roles and set `NOLOGIN`.
    Keep,
    /// Create it; after its last session drop it, or do as `keep` when objects depend on it.
    BestEffortDrop,
}

impl CreateDbUserMode {
    pub fn is_off(&self) -> bool {
        *self == Self::Off
    }
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
    /// `auth: rds-iam`: the AWS region the token is signed for (required there, nowhere else).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `auth: rds-iam`: the host name the token is signed for, when `address` names the
    /// database otherwise (an IP, a private DNS alias; default: the host part of `address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_host: Option<String>,
    /// `auth: rds-iam`, optional: the AWS account (12 digits) and the instance's resource id
    /// (`DbiResourceId`, `db-…`; an Aurora cluster's `cluster-…`). Nothing signs with them:
    /// they only complete the `rds-db:connect` ARN the client's hint names when RDS refuses
    /// a login, instead of `<account>` and `<resource-id>` placeholders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// Reuse logged-in server sessions across client sessions (off when absent).
    #[serde(default)]
    pub reuse: Option<ReuseConfig>,
    /// Startup parameters clients may set on this route beyond the gateway's built-in
    /// allow-list (`policy::startup::ALLOWED`); anything else is refused at startup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub startup_parameters: Vec<String>,
    /// The database user that creates and retires automatic users (roles with
    /// `create_db_user_mode`), logged in like any user (certificate or IAM token). It needs
    /// `CREATEROLE` and the admin option on the roles it grants (`rds_iam` on RDS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_user: Option<String>,
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
    #[serde(default = "default_reuse_idle_timeout", with = "human_duration")]
    pub idle_timeout: Duration,
    /// A server session is not reused once it is this old (it logs in again with a fresh
    /// certificate, and role changes on the server take effect).
    #[serde(default = "default_reuse_max_lifetime", with = "human_duration")]
    pub max_lifetime: Duration,
}

/// The settings of `reuse: {}`.
impl Default for ReuseConfig {
    fn default() -> Self {
        Self {
            max_idle: DEFAULT_REUSE_MAX_IDLE,
            idle_timeout: DEFAULT_REUSE_IDLE_TIMEOUT,
            max_lifetime: DEFAULT_REUSE_MAX_LIFETIME,
        }
    }
}

fn default_reuse_max_idle() -> usize {
    DEFAULT_REUSE_MAX_IDLE
}
fn default_reuse_idle_timeout() -> Duration {
    DEFAULT_REUSE_IDLE_TIMEOUT
}
fn default_reuse_max_lifetime() -> Duration {
    DEFAULT_REUSE_MAX_LIFETIME
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamAuth {
    /// A short-lived client certificate with CN = database user (`hostssl … cert`).
    Cert,
    /// Amazon RDS IAM authentication: a SigV4 presigned token sent as the cleartext password
    /// RDS asks for, over TLS only (`upstream/rds_iam.rs`).
    RdsIam,
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
        self.server_name
            .as_deref()
            .unwrap_or_else(|| self.address_host())
    }

    /// The host part of `address`, without the brackets of an IPv6 literal.
    fn address_host(&self) -> &str {
        self.address
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(&self.address)
    }

    /// The host and port an RDS IAM token is signed for: `iam_host` (or the host of
    /// `address`) and the port of `address` (RDS checks both against its endpoint).
    pub fn iam_endpoint(&self) -> (&str, u16) {
        let host = self
            .iam_host
            .as_deref()
            .unwrap_or_else(|| self.address_host());
        let port = self
            .address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(DEFAULT_RDS_PORT);
        (host, port)
    }
}

impl UpstreamConfig {
    /// The IAM resource `rds-db:connect` must allow for a login as `user` on this route,
    /// with placeholders for what the configuration does not say.
    pub fn rds_db_user_arn(&self, user: &str) -> String {
        format!(
            "arn:aws:rds-db:{}:{}:dbuser:{}/{user}",
            self.region.as_deref().unwrap_or("<region>"),
            self.account_id.as_deref().unwrap_or("<account>"),
            self.resource_id.as_deref().unwrap_or("<resource-id>"),
        )
    }

    /// `account_id` and `resource_id` as AWS writes them.
    fn validate_aws_ids(&self) -> Result<(), String> {
        if let Some(a) = &self.account_id
            && !(a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(format!(
                "upstream.account_id {a:?} is not an AWS account id (12 digits)"
            ));
        }
        if let Some(r) = &self.resource_id {
            let rest = r
                .strip_prefix("db-")
                .or_else(|| r.strip_prefix("cluster-"))
                .unwrap_or_default();
            if rest.is_empty()
                || !rest
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            {
                return Err(format!(
                    "upstream.resource_id {r:?} is not an RDS resource id (db-… for an instance's DbiResourceId, cluster-… for an Aurora cluster's; upper-case letters and digits)"
                ));
            }
        }
        Ok(())
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
        if cfg.audit.path != DEFAULT_AUDIT_PATH {
            let mut p = PathBuf::from(&cfg.audit.path);
            resolve(&base, &mut p);
            cfg.audit.path = p.to_string_lossy().into_owned();
        }
        let check = cfg.validate();
        invalid_at(path, check).map(|()| cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.audit.queue < 2 || self.audit.queue > MAX_AUDIT_QUEUE {
            return Err(format!(
                "audit.queue: {} is outside 2 to {MAX_AUDIT_QUEUE} records",
                self.audit.queue
            ));
        }
        self.validate_bounds()?;
        let mut names = std::collections::HashSet::new();
        for (i, d) in self.databases.iter().enumerate() {
            if !names.insert(d.name.as_str()) {
                return Err(format!("databases: name {:?} is used twice", d.name));
            }
            let u = &d.upstream;
            match d.protocol {
                Protocol::Postgres if u.auth.is_none() => {
                    return Err(format!(
                        "databases[{i}] ({}): upstream.auth is required (auth: cert or rds-iam)",
                        d.name
                    ));
                }
                Protocol::Postgres if u.ca.is_none() => {
                    return Err(format!(
                        "databases[{i}] ({}): upstream.ca is required (the CA bundle of the server's certificate)",
                        d.name
                    ));
                }
                Protocol::Postgres
                    if u.auth != Some(UpstreamAuth::RdsIam)
                        && (u.region.is_some()
                            || u.iam_host.is_some()
                            || u.account_id.is_some()
                            || u.resource_id.is_some()) =>
                {
                    return Err(format!(
                        "databases[{i}] ({}): upstream.region, iam_host, account_id and resource_id only apply to auth: rds-iam",
                        d.name
                    ));
                }
                Protocol::Postgres
                    if u.auth == Some(UpstreamAuth::RdsIam)
                        && u.region.as_deref().is_none_or(str::is_empty) =>
                {
                    return Err(format!(
                        "databases[{i}] ({}): auth: rds-iam needs upstream.region (the database's AWS region, e.g. us-east-1)",
                        d.name
                    ));
                }
                Protocol::Tcp
                    if u.auth.is_some()
                        || u.ca.is_some()
                        || u.server_name.is_some()
                        || u.region.is_some()
                        || u.iam_host.is_some()
                        || u.account_id.is_some()
                        || u.resource_id.is_some()
                        || u.reuse.is_some()
                        || u.admin_user.is_some() =>
                {
                    return Err(format!(
                        "databases[{i}] ({}): a tcp route relays plain bytes; upstream.auth, upstream.ca, upstream.server_name and upstream.reuse do not apply",
                        d.name
                    ));
                }
                _ => {}
            }
            u.validate_aws_ids()
                .map_err(|e| format!("databases[{i}] ({}): {e}", d.name))?;
            if let Some(p) = u
                .startup_parameters
                .iter()
                .filter(|p| !p.eq_ignore_ascii_case("replication"))
                .find(|p| PRIVILEGED_STARTUP_PARAMETERS.contains(&p.to_ascii_lowercase().as_str()))
            {
                // `replication` may be listed: it opens a walsender for the policy's user,
                // whose privileges the database still checks (issue 20, CopyBoth).
                return Err(format!(
                    "databases[{i}] ({}): upstream.startup_parameters may not list \"{p}\": it changes the session's role, which the policy decides",
                    d.name
                ));
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
            if !r.create_db_user_mode.is_off()
                && let Some(d) = self
                    .databases
                    .iter()
                    .filter(|d| d.protocol.is_postgres())
                    .find(|d| r.databases.covers(d) && d.upstream.admin_user.is_none())
            {
                return Err(format!(
                    "roles[{i}] ({}): create_db_user_mode needs upstream.admin_user on database {:?} (the user that creates database users)",
                    r.name, d.name
                ));
            }
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

impl ProxyConfig {
    /// Timeouts and caps: none may be 0 (a cap of 0 would refuse everything, a timeout of
    /// 0 would time out everything), and the login's total covers its connect.
    fn validate_bounds(&self) -> Result<(), String> {
        for (name, t) in [
            ("startup_timeout", self.startup_timeout),
            ("tunnel_idle_timeout", self.tunnel_idle_timeout),
            ("upstream_connect_timeout", self.upstream_connect_timeout),
            ("tls_handshake_timeout", self.tls_handshake_timeout),
            ("upstream_login_timeout", self.upstream_login_timeout),
        ] {
            if t.is_zero() {
                return Err(format!("{name} must be more than 0"));
            }
        }
        if self.upstream_login_timeout < self.upstream_connect_timeout {
            return Err(format!(
                "upstream_login_timeout ({:?}) must be at least upstream_connect_timeout ({:?}): it bounds the whole login, connect included",
                self.upstream_login_timeout, self.upstream_connect_timeout
            ));
        }
        for (name, n) in [
            ("max_connections", self.max_connections),
            ("max_sessions_per_identity", self.max_sessions_per_identity),
            ("max_sessions_per_route", self.max_sessions_per_route),
        ] {
            if n == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardening_08_timeouts_and_caps_default_on_and_are_validated() {
        let base = "listen: '127.0.0.1:0'\ntrust_domain: td\ntls: {cert: c, key: k, client_ca: ca}\ndb_client_ca: {cert: c, key: k}\ndatabases: []\n";
        let load = |extra: &str| {
            parse_yaml::<ProxyConfig>(Path::new("p.yaml"), &format!("{base}{extra}")).unwrap()
        };
        let cfg = load("");
        assert_eq!(cfg.tls_handshake_timeout, DEFAULT_TLS_HANDSHAKE_TIMEOUT);
        assert_eq!(cfg.upstream_login_timeout, DEFAULT_UPSTREAM_LOGIN_TIMEOUT);
        assert_eq!(cfg.max_connections, DEFAULT_PROXY_MAX_CONNECTIONS);
        assert_eq!(
            cfg.max_sessions_per_identity,
            DEFAULT_MAX_SESSIONS_PER_IDENTITY
        );
        assert_eq!(cfg.max_sessions_per_route, DEFAULT_MAX_SESSIONS_PER_ROUTE);
        assert_eq!(cfg.validate(), Ok(()));
        for (extra, error) in [
            ("max_connections: 0\n", "max_connections must be at least 1"),
            (
                "max_sessions_per_identity: 0\n",
                "max_sessions_per_identity must be at least 1",
            ),
            (
                "tls_handshake_timeout: 0s\n",
                "tls_handshake_timeout must be more than 0",
            ),
            (
                "upstream_login_timeout: 1s\nupstream_connect_timeout: 2s\n",
                "upstream_login_timeout (1s) must be at least upstream_connect_timeout (2s): it bounds the whole login, connect included",
            ),
        ] {
            assert_eq!(load(extra).validate(), Err(error.to_owned()), "{extra}");
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
        // Automatic users need an admin user on every postgres route they cover.
        let auto_role = "  - {name: r, match: {namespace: a}, databases: {names: [main]}, db_users: [u], db_names: [d], create_db_user_mode: keep, db_roles: [reader]}\n";
        let e = check(pg, auto_role).unwrap_err();
        assert_eq!(
            e,
            "roles[0] (r): create_db_user_mode needs upstream.admin_user on database \"main\" (the user that creates database users)"
        );
        let with_admin = "  - {name: main, upstream: {address: 'db:5432', auth: cert, ca: ca, admin_user: gw_admin}}\n";
        assert_eq!(check(with_admin, auto_role), Ok(()));
        let e = check(
            "  - {name: echo, protocol: tcp, upstream: {address: 'echo:7', admin_user: a}}\n",
            tcp_role,
        )
        .unwrap_err();
        assert!(e.contains("a tcp route relays plain bytes"), "{e}");
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
        // A route may allow more startup parameters, never the privileged ones.
        let extra = |p: &str| {
            format!(
                "  - {{name: main, upstream: {{address: 'db:5432', auth: cert, ca: c, startup_parameters: [{p}]}}}}\n"
            )
        };
        assert_eq!(check(&extra("plan_cache_mode"), "  []\n"), Ok(()));
        for p in ["role", "Session_Authorization", "is_superuser"] {
            let e = check(&extra(p), "  []\n").unwrap_err();
            assert!(e.contains(&format!("may not list \"{p}\"")), "{e}");
        }
        assert_eq!(check(&extra("replication"), "  []\n"), Ok(()));
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
    fn upstream_server_name_defaults_to_host() {
        let u = UpstreamConfig {
            address: "db.example.com:5432".into(),
            auth: Some(UpstreamAuth::Cert),
            tls: UpstreamTlsMode::VerifyFull,
            ca: Some(PathBuf::from("ca")),
            server_name: None,
            region: None,
            iam_host: None,
            account_id: None,
            resource_id: None,
            reuse: None,
            startup_parameters: Vec::new(),
            admin_user: None,
        };
        assert_eq!(u.server_name(), "db.example.com");
        assert_eq!(u.iam_endpoint(), ("db.example.com", 5432));
    }

    #[test]
    fn rds_iam_needs_a_region_and_tls() {
        let base = "listen: '127.0.0.1:0'\ntrust_domain: td\ntls: {cert: c, key: k, client_ca: ca}\ndb_client_ca: {cert: c, key: k}\nroles: []\n";
        let parse = |db: &str| {
            parse_yaml::<ProxyConfig>(Path::new("p.yaml"), &format!("{base}databases:\n{db}"))
        };
        let cfg = parse("  - {name: rds, upstream: {address: '10.0.3.7:6432', auth: rds-iam, region: us-east-1, iam_host: db.x.us-east-1.rds.amazonaws.com, tls: verify-full, ca: rds-ca.pem}}\n").unwrap();
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(
            cfg.databases[0].upstream.iam_endpoint(),
            ("db.x.us-east-1.rds.amazonaws.com", 6432)
        );
        let e = parse("  - {name: rds, upstream: {address: 'db:5432', auth: rds-iam, ca: c}}\n")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.contains("auth: rds-iam needs upstream.region"), "{e}");
        let e = parse(
            "  - {name: rds, upstream: {address: 'db:5432', auth: rds-iam, region: us-east-1}}\n",
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(e.contains("upstream.ca is required"), "{e}");
        let e = parse(
            "  - {name: m, upstream: {address: 'db:5432', auth: cert, ca: c, region: us-east-1}}\n",
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(e.contains("only apply to auth: rds-iam"), "{e}");
        // verify-full is the only TLS mode there is: anything else does not parse.
        let e = parse("  - {name: rds, upstream: {address: 'db:5432', auth: rds-iam, region: r, ca: c, tls: disable}}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `disable`"), "{e}");
    }

    #[test]
    fn rds_account_and_resource_ids_complete_the_arn_and_are_checked() {
        let base = "listen: '127.0.0.1:0'\ntrust_domain: td\ntls: {cert: c, key: k, client_ca: ca}\ndb_client_ca: {cert: c, key: k}\nroles: []\n";
        let load = |ids: &str| {
            let yaml = format!(
                "{base}databases:\n  - {{name: rds, upstream: {{address: 'db:5432', auth: rds-iam, region: ca-central-1, ca: c{ids}}}}}\n"
            );
            let cfg = parse_yaml::<ProxyConfig>(Path::new("p.yaml"), &yaml).unwrap();
            cfg.validate().map(|()| cfg)
        };
        let cfg = load(", account_id: '123456789012', resource_id: db-ABCDEFGHIJKL01234").unwrap();
        assert_eq!(
            cfg.databases[0].upstream.rds_db_user_arn("bot-temporal"),
            "arn:aws:rds-db:ca-central-1:123456789012:dbuser:db-ABCDEFGHIJKL01234/bot-temporal"
        );
        let aurora = load(", resource_id: cluster-ABCDEFGHIJKL01234").unwrap();
        assert_eq!(
            aurora.databases[0].upstream.rds_db_user_arn("u"),
            "arn:aws:rds-db:ca-central-1:<account>:dbuser:cluster-ABCDEFGHIJKL01234/u"
        );
        // Unset: placeholders, as before.
        let plain = load("").unwrap();
        assert_eq!(
            plain.databases[0].upstream.rds_db_user_arn("u"),
            "arn:aws:rds-db:ca-central-1:<account>:dbuser:<resource-id>/u"
        );
        for (ids, want) in [
            (
                ", account_id: '12345678901'",
                "is not an AWS account id (12 digits)",
            ),
            (
                ", account_id: 12345678901x",
                "is not an AWS account id (12 digits)",
            ),
            (", resource_id: ABCDEF", "is not an RDS resource id"),
            (", resource_id: db-", "is not an RDS resource id"),
            (", resource_id: db-abc/def", "is not an RDS resource id"),
            (", resource_id: temporal-db", "is not an RDS resource id"),
        ] {
            let e = load(ids).unwrap_err();
            assert!(e.starts_with("databases[0] (rds): upstream."), "{ids}: {e}");
            assert!(e.contains(want), "{ids}: {e}");
        }
        // Only on rds-iam routes.
        let yaml = format!(
            "{base}databases:\n  - {{name: m, upstream: {{address: 'db:5432', auth: cert, ca: c, account_id: '123456789012'}}}}\n"
        );
        let e = parse_yaml::<ProxyConfig>(Path::new("p.yaml"), &yaml)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.contains("only apply to auth: rds-iam"), "{e}");
    }
}
