//! The node's and the proxy's configuration for a [`Stack`](super::Stack), built as the
//! [`crate::config`] structs the processes load and written with `serde_norway`: a renamed
//! or retyped field breaks the build here instead of a test run. Relative paths are
//! relative to the stack directory, where the files are written (the loaders resolve them
//! against the file's directory).
//!
//! What a test adds ([`StackSpec`]'s roles, extra databases, reuse settings and node
//! `data_plane`) is already those structs and goes in as it is; its [`ProxySettings`] are
//! laid over the harness's top-level proxy settings field by field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use super::kernel::Kernel;
use super::machine::loopback;
use super::spec::{
    CA_SERVER_NAME, DEMO_TRUST_DOMAIN, INVENTORY, NODE_CERT, NODE_KEY, NODE_NAME,
    PROXY_SERVER_NAME, ProxySettings, ROUTE, StackSpec,
};
use crate::config::{
    AuditConfig, CaEndpoint, CaFiles, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DB_CLIENT_CERT_TTL,
    DEFAULT_DRAIN_GRACE, DEFAULT_MAX_SESSIONS_PER_IDENTITY, DEFAULT_MAX_SESSIONS_PER_ROUTE,
    DEFAULT_PROXY_MAX_CONNECTIONS, DEFAULT_STARTUP_TIMEOUT, DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    DEFAULT_TUNNEL_IDLE_TIMEOUT, DEFAULT_UPSTREAM_LOGIN_TIMEOUT, DatabaseConfig, IdentityConfig,
    IdentityFiles, InterceptionConfig, ListenerConfig, NodeConfig, ProxyConfig, ProxyEndpoint,
    ProxyTls, RouteConfig, UpstreamAuth, UpstreamConfig, UpstreamTlsMode,
};
use crate::pki;
use crate::pod::PodMeta;
use crate::route::Protocol;

/// How long the transparent node waits for a pod its inventory does not list.
const UNKNOWN_POD_WAIT: Duration = Duration::from_secs(1);

/// A path below the stack's CA directory (`ca/`).
fn in_ca_dir(file: &str) -> PathBuf {
    Path::new("ca").join(file)
}

/// The proxy of a stack whose PostgreSQL listens on `pg_port`.
pub fn proxy_config(spec: &StackSpec, pg_port: u16) -> ProxyConfig {
    let mut databases = Vec::new();
    let main = (ROUTE, &spec.upstream_reuse, &None);
    let extra = spec
        .pg_routes
        .iter()
        .map(|r| (r.name.as_str(), &r.reuse, &r.admin_user));
    for (name, reuse, admin_user) in std::iter::once(main).chain(extra) {
        databases.push(DatabaseConfig {
            name: name.into(),
            labels: [("env".to_owned(), "demo".to_owned())].into(),
            protocol: Protocol::Postgres,
            upstream: UpstreamConfig {
                address: loopback(pg_port).to_string(),
                auth: Some(UpstreamAuth::Cert),
                tls: UpstreamTlsMode::VerifyFull,
                ca: Some(super::spec::DB_SERVER_CA.into()),
                server_name: Some("localhost".into()),
                region: None,
                iam_host: None,
                account_id: None,
                resource_id: None,
                reuse: reuse.clone(),
                startup_parameters: Vec::new(),
                admin_user: admin_user.clone(),
            },
        });
    }
    databases.extend(spec.extra_databases.iter().cloned());
    for r in &spec.tcp_routes {
        databases.push(DatabaseConfig {
            name: r.name.clone(),
            labels: Default::default(),
            protocol: Protocol::Tcp,
            upstream: UpstreamConfig {
                address: r.upstream.to_string(),
                auth: None,
                tls: UpstreamTlsMode::VerifyFull,
                ca: None,
                server_name: None,
                region: None,
                iam_host: None,
                account_id: None,
                resource_id: None,
                reuse: None,
                startup_parameters: Vec::new(),
                admin_user: None,
            },
        });
    }
    let ProxySettings {
        threads,
        drain_grace,
        tunnel_idle_timeout,
        tls_handshake_timeout,
        upstream_login_timeout,
        max_connections,
        max_sessions_per_identity,
        max_sessions_per_route,
        ..
    } = spec.proxy;
    ProxyConfig {
        // Port 0 everywhere: the kernel picks, the process reports (no port races).
        listen: loopback(0),
        threads: threads.unwrap_or(0),
        admin_listen: loopback(0),
        trust_domain: DEMO_TRUST_DOMAIN.into(),
        tls: ProxyTls {
            cert: "proxy.crt".into(),
            key: "proxy.key".into(),
            client_ca: in_ca_dir(pki::WORKLOAD_BUNDLE),
        },
        db_client_ca: CaFiles {
            cert: in_ca_dir(pki::DB_CLIENT_CA_CERT),
            key: in_ca_dir(pki::DB_CLIENT_CA_KEY),
        },
        db_client_cert_ttl: DEFAULT_DB_CLIENT_CERT_TTL,
        audit: AuditConfig {
            path: "audit.jsonl".into(),
            ..AuditConfig::default()
        },
        drain_grace: drain_grace.unwrap_or(DEFAULT_DRAIN_GRACE),
        startup_timeout: DEFAULT_STARTUP_TIMEOUT,
        tunnel_idle_timeout: tunnel_idle_timeout.unwrap_or(DEFAULT_TUNNEL_IDLE_TIMEOUT),
        upstream_connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        tls_handshake_timeout: tls_handshake_timeout.unwrap_or(DEFAULT_TLS_HANDSHAKE_TIMEOUT),
        upstream_login_timeout: upstream_login_timeout.unwrap_or(DEFAULT_UPSTREAM_LOGIN_TIMEOUT),
        max_connections: max_connections.unwrap_or(DEFAULT_PROXY_MAX_CONNECTIONS),
        max_sessions_per_identity: max_sessions_per_identity
            .unwrap_or(DEFAULT_MAX_SESSIONS_PER_IDENTITY),
        max_sessions_per_route: max_sessions_per_route.unwrap_or(DEFAULT_MAX_SESSIONS_PER_ROUTE),
        replica_index: None,
        roles: spec.roles.clone(),
        databases,
    }
}

/// The node of a stack whose proxy listens on `proxy_addr`; with `kernel` (transparent
/// mode) it intercepts the kernel's database address and asks the CA at `ca_addr`.
pub fn node_config(
    spec: &StackSpec,
    proxy_addr: SocketAddr,
    kernel: Option<&Kernel>,
    ca_addr: SocketAddr,
) -> NodeConfig {
    let listeners = spec
        .workloads
        .iter()
        .enumerate()
        .map(|(i, w)| ListenerConfig {
            listen: loopback(0),
            route: w.route.clone(),
            protocol: w.protocol,
            identity: IdentityFiles {
                cert: format!("workload-{i}.crt").into(),
                key: format!("workload-{i}.key").into(),
            },
            pod: PodMeta {
                namespace: Some(w.namespace.clone()),
                name: Some(format!("{}-{i}", w.service_account)),
                service_account: Some(w.service_account.clone()),
                ..PodMeta::default()
            },
            expose: false,
            client_tls: w.client_tls.then(|| IdentityFiles {
                cert: super::spec::LISTENER_TLS_CERT.into(),
                key: super::spec::LISTENER_TLS_KEY.into(),
            }),
        })
        .collect();
    NodeConfig {
        node_name: NODE_NAME.into(),
        admin_listen: loopback(0),
        proxy: ProxyEndpoint {
            address: proxy_addr.to_string(),
            server_name: PROXY_SERVER_NAME.into(),
            ca: in_ca_dir(pki::WORKLOAD_BUNDLE),
            replicas: Vec::new(),
        },
        data_plane: spec.data_plane.clone(),
        listeners,
        interception: kernel.map(|k| interception(spec, k, ca_addr)),
    }
}

fn interception(spec: &StackSpec, k: &Kernel, ca_addr: SocketAddr) -> InterceptionConfig {
    // The IPv6 database address is intercepted only when the agent has an IPv6 address.
    let v6 = k.db_addr_v6.zip(k.agent_addr_v6);
    let mut main = vec![k.db_addr.to_string()];
    main.extend(v6.map(|(db6, _)| db6.to_string()));
    let mut routes = vec![RouteConfig {
        match_destination: main,
        route: ROUTE.into(),
        protocol: Protocol::Postgres,
        client_tls: crate::config::ClientTlsConfig {
            enabled: true,
            server_names: vec![super::spec::DB_SERVER_NAME.into()],
        },
    }];
    let mut destinations = Vec::new();
    for r in &spec.tcp_routes {
        let dst = SocketAddr::new(k.db_addr.ip(), r.intercept_port);
        routes.push(RouteConfig {
            match_destination: vec![dst.to_string()],
            route: r.name.clone(),
            protocol: Protocol::Tcp,
            client_tls: Default::default(),
        });
        destinations.push(format!("{}/32:{}", k.db_addr.ip(), r.intercept_port));
    }
    InterceptionConfig {
        cgroup: Some(k.tree.root.clone()),
        pin_dir: k.pin_dir.clone(),
        agent_address: k.agent_addr,
        agent_address_v6: v6.map(|(_, agent6)| agent6),
        agent_interface: k.agent_interface.clone(),
        ports: vec![crate::ebpf::DEFAULT_PORT],
        destinations,
        fail_open: false,
        max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
        connections_per_cgroup: crate::config::DEFAULT_CONNECTIONS_PER_CGROUP,
        routes,
        identity: IdentityConfig {
            trust_domain: DEMO_TRUST_DOMAIN.into(),
            inventory: Some(INVENTORY.into()),
            kubernetes: None,
            unknown_pod_wait: UNKNOWN_POD_WAIT,
            kubelet_cgroup_roots: vec![k.kubelet_root.clone()],
            cgroup_walk_interval: crate::config::DEFAULT_CGROUP_WALK_INTERVAL,
        },
        ca: CaEndpoint {
            // A name, as on a cluster (a Service's DNS name): looked up at every request.
            address: format!("localhost:{}", ca_addr.port()),
            server_name: CA_SERVER_NAME.into(),
            ca: in_ca_dir(pki::WORKLOAD_BUNDLE),
            node_cert: NODE_CERT.into(),
            node_key: NODE_KEY.into(),
            join: None,
            timeout: crate::config::DEFAULT_CA_TIMEOUT,
        },
    }
}

/// Writes `config` as YAML to `path`.
pub fn write_yaml<T: Serialize>(path: &Path, config: &T) -> Result<()> {
    let text = serde_norway::to_string(config).context("failed to serialize a config")?;
    std::fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        DataPlaneConfig, DatabaseSelector, Effect, MatchConfig, ReuseConfig, RoleConfig,
    };
    use crate::harness::machine::temp_dir;
    use crate::harness::spec::{NODE_THREADS, PgRoute, TcpRoute, Workload, node_data_plane, role};

    fn spec() -> StackSpec {
        StackSpec {
            gateway_bin: "gateway".into(),
            workloads: vec![
                Workload::new("team-a", "api"),
                Workload::tcp("team-a", "api", "echo"),
            ],
            roles: vec![role(
                "team-a",
                "team-a",
                &["main"],
                &["{{ .service_account }}"],
                &["app"],
            )],
            proxy: ProxySettings {
                drain_grace: Some(Duration::from_secs(20)),
                threads: Some(1),
                ..ProxySettings::default()
            },
            data_plane: DataPlaneConfig {
                warm_tunnel_idle: Duration::from_millis(1500),
                ..node_data_plane()
            },
            extra_databases: vec![DatabaseConfig {
                name: "down".into(),
                labels: Default::default(),
                protocol: Protocol::Postgres,
                upstream: UpstreamConfig {
                    address: "127.0.0.1:1".into(),
                    auth: Some(UpstreamAuth::Cert),
                    tls: UpstreamTlsMode::VerifyFull,
                    ca: Some("ca/x.crt".into()),
                    server_name: None,
                    region: None,
                    iam_host: None,
                    account_id: None,
                    resource_id: None,
                    reuse: None,
                    startup_parameters: Vec::new(),
                    admin_user: None,
                },
            }],
            upstream_reuse: Some(ReuseConfig {
                max_idle: 2,
                idle_timeout: Duration::from_secs(3),
                ..ReuseConfig::default()
            }),
            pg_routes: vec![PgRoute {
                name: "main-reuse".into(),
                reuse: None,
                admin_user: None,
            }],
            tcp_routes: vec![TcpRoute {
                name: "echo".into(),
                upstream: "127.0.0.1:7".parse().unwrap(),
                intercept_port: 7000,
            }],
            setup_sql: Vec::new(),
            transparent: None,
            extra_hba: Vec::new(),
        }
    }

    /// The written files, loaded as the processes load them.
    fn written(spec: &StackSpec) -> (ProxyConfig, NodeConfig, PathBuf) {
        let dir = temp_dir("db-gateway-harness-test").unwrap();
        write_yaml(&dir.join("proxy.yaml"), &proxy_config(spec, 5555)).unwrap();
        let proxy_addr: SocketAddr = "127.0.0.1:4444".parse().unwrap();
        let node = node_config(spec, proxy_addr, None, loopback(0));
        write_yaml(&dir.join("node.yaml"), &node).unwrap();
        let proxy = ProxyConfig::load(&dir.join("proxy.yaml"));
        let node = NodeConfig::load(&dir.join("node.yaml"));
        let _ = std::fs::remove_dir_all(&dir);
        (proxy.unwrap(), node.unwrap(), dir)
    }

    /// What the harness writes is what the processes load, with the test's settings in.
    #[test]
    fn written_configs_load_with_the_test_settings_laid_over_the_defaults() {
        let (proxy, node, dir) = written(&spec());

        assert_eq!(proxy.drain_grace, Duration::from_secs(20));
        assert_eq!(proxy.threads, 1);
        assert_eq!(proxy.tunnel_idle_timeout, DEFAULT_TUNNEL_IDLE_TIMEOUT);
        assert_eq!(proxy.audit.path, dir.join("audit.jsonl").to_str().unwrap());
        assert_eq!(
            proxy.tls.client_ca,
            dir.join("ca").join(pki::WORKLOAD_BUNDLE)
        );
        assert_eq!(proxy.roles.len(), 1);
        assert_eq!(proxy.roles[0].db_users, ["{{ .service_account }}"]);
        let names: Vec<&str> = proxy.databases.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["main", "main-reuse", "down", "echo"]);
        let main = &proxy.databases[0];
        assert_eq!(main.upstream.address, "127.0.0.1:5555");
        assert_eq!(main.upstream.server_name(), "localhost");
        assert_eq!(main.labels.get("env").map(String::as_str), Some("demo"));
        let reuse = main.upstream.reuse.as_ref().unwrap();
        assert_eq!(reuse.max_idle, 2);
        assert_eq!(reuse.idle_timeout, Duration::from_secs(3));
        assert!(proxy.databases[1].upstream.reuse.is_none());
        assert_eq!(proxy.databases[3].protocol, Protocol::Tcp);
        assert_eq!(proxy.databases[3].upstream.address, "127.0.0.1:7");

        assert_eq!(node.node_name, NODE_NAME);
        assert_eq!(node.proxy.address, "127.0.0.1:4444");
        assert_eq!(node.data_plane.threads, NODE_THREADS);
        assert_eq!(
            node.data_plane.warm_tunnel_idle,
            Duration::from_millis(1500)
        );
        assert!(node.interception.is_none());
        assert_eq!(node.listeners.len(), 2);
        assert_eq!(node.listeners[1].route, "echo");
        assert_eq!(node.listeners[1].protocol, Protocol::Tcp);
        assert_eq!(node.listeners[1].identity.cert, dir.join("workload-1.crt"));
        assert_eq!(node.listeners[0].pod.name.as_deref(), Some("api-0"));
    }

    #[test]
    fn a_threads_setting_replaces_the_node_default() {
        let mut spec = spec();
        spec.data_plane = node_data_plane();
        spec.data_plane.threads = 1;
        let node = node_config(&spec, loopback(1), None, loopback(0));
        assert_eq!(node.data_plane.threads, 1);
        assert_eq!(
            node.data_plane.warm_tunnel_idle,
            DataPlaneConfig::default().warm_tunnel_idle
        );
    }

    /// Settings a test leaves alone keep the harness's values; the ones it sets (including
    /// a role's force flags and effect, and reuse's defaults) reach the written files.
    #[test]
    fn unset_proxy_settings_keep_the_harness_values_and_set_ones_are_written() {
        let mut spec = spec();
        spec.proxy = ProxySettings {
            tunnel_idle_timeout: Some(Duration::from_secs(1)),
            ..ProxySettings::default()
        };
        spec.roles[0].force_db_user = true;
        spec.roles[0].force_db_name = true;
        spec.roles.push(RoleConfig {
            name: "no-echo".into(),
            effect: Effect::Deny,
            matcher: MatchConfig {
                spiffe_id: Some("spiffe://x/*".into()),
                ..MatchConfig::default()
            },
            databases: DatabaseSelector {
                labels: [("env".to_owned(), "demo".to_owned())].into(),
                ..DatabaseSelector::default()
            },
            ..RoleConfig::default()
        });
        spec.pg_routes[0].reuse = Some(ReuseConfig::default());
        let (proxy, node, _) = written(&spec);
        assert_eq!(proxy.threads, 0);
        assert_eq!(proxy.drain_grace, DEFAULT_DRAIN_GRACE);
        assert_eq!(proxy.tunnel_idle_timeout, Duration::from_secs(1));
        assert!(proxy.roles[0].force_db_user && proxy.roles[0].force_db_name);
        let deny = &proxy.roles[1];
        assert_eq!(deny.effect, Effect::Deny);
        assert_eq!(deny.matcher.spiffe_id.as_deref(), Some("spiffe://x/*"));
        assert_eq!(
            deny.databases.labels.get("env").map(String::as_str),
            Some("demo")
        );
        let reuse = proxy.databases[1].upstream.reuse.as_ref().unwrap();
        assert_eq!(reuse.max_idle, crate::config::DEFAULT_REUSE_MAX_IDLE);
        assert_eq!(
            reuse.max_lifetime,
            crate::config::DEFAULT_REUSE_MAX_LIFETIME
        );
        assert_eq!(
            node.data_plane.warm_tunnel_idle,
            Duration::from_millis(1500)
        );
    }
}
