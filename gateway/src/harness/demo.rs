//! `gateway up`: one demo workload on a whole local [`Stack`], until Ctrl-C.

use anyhow::Result;

use super::machine::is_root;
use super::spec::{PodSpec, ProxySettings, StackSpec, TransparentSpec, Workload, node_data_plane};
use super::stack::Stack;
use crate::config::{DatabaseSelector, MatchConfig, RoleConfig};

/// Shell-quotes one word for the `POD` line.
fn shell_quote(w: &str) -> String {
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:".contains(&b))
    {
        w.to_owned()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// `gateway up`: one demo workload, `demo/app`, allowed as database user `app` on
/// database `app`. As root the workload is a pod (network namespace + kubelet-shaped
/// cgroup) intercepted by eBPF; otherwise, or with `explicit`, an explicit-mode listener.
pub fn run(keep: bool, explicit: bool) -> Result<()> {
    let spec = spec(std::env::current_exe()?, !explicit && is_root());
    let mut stack = Stack::start(spec)?;
    stack.keep_dir = keep;
    eprintln!("db-gateway demo in {}", stack.dir.display());
    eprintln!(
        "  PostgreSQL 15 on 127.0.0.1:{} (certificate logins only)",
        stack.pg.port
    );
    eprintln!(
        "  proxy on {} (admin http://{}/metrics)",
        stack.proxy_addr, stack.proxy_admin
    );
    eprintln!("  node agent admin http://{}/metrics", stack.node_admin);
    eprintln!("  audit log {}", stack.audit_path.display());
    eprintln!(
        "  trust bundle {} (sslrootcert= for sslmode=verify-ca/verify-full)",
        stack.trust_bundle.display()
    );
    let (ready, pod) = match &stack.kernel {
        Some(k) => {
            let conn = format!(
                "host={} port={} user=app dbname=app sslmode=disable",
                k.db_addr.ip(),
                k.db_addr.port()
            );
            let prefix: Vec<String> = k.pods[0]
                .command_prefix()
                .iter()
                .map(|w| shell_quote(w))
                .collect();
            eprintln!(
                "  pod demo/app-0 (uid {}) in its own network namespace; {} is intercepted by eBPF",
                k.pods[0].uid, k.db_addr
            );
            (conn, Some(prefix.join(" ")))
        }
        None => (stack.conn_string(0, "app", "app"), None),
    };
    match &pod {
        Some(p) => eprintln!(
            "Try: {p} psql \"{ready}\" -c 'select current_user'   (Ctrl-C stops and cleans up)"
        ),
        None => eprintln!(
            "Try: psql \"{ready}\" -c 'select current_user'   (Ctrl-C stops and cleans up)"
        ),
    }
    println!("READY {ready}");
    if let Some(p) = &pod {
        println!("POD {p}");
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(crate::admin::shutdown_signal());
    eprintln!("stopping and cleaning up");
    if keep {
        eprintln!("keeping {}", stack.dir.display());
    }
    drop(stack);
    Ok(())
}

/// The demo's stack: one pod `demo/app` (transparent, as root) or one explicit listener,
/// mapped to the database user and database `app`.
pub fn spec(gateway_bin: std::path::PathBuf, transparent: bool) -> StackSpec {
    StackSpec {
        gateway_bin,
        workloads: if transparent {
            Vec::new()
        } else {
            vec![Workload::new("demo", "app")]
        },
        roles: vec![RoleConfig {
            name: "demo-apps".into(),
            matcher: MatchConfig {
                namespace: Some("demo".into()),
                ..MatchConfig::default()
            },
            databases: DatabaseSelector {
                labels: [("env".to_owned(), "demo".to_owned())].into(),
                ..DatabaseSelector::default()
            },
            // The pod's service account is its database user and database; a client that
            // names another gets 28000 / 3D000 with the allowed ones in the hint (nothing
            // is replaced behind its back).
            db_users: vec!["{{ .service_account }}".into()],
            db_names: vec!["{{ .service_account }}".into()],
            force_db_user: false,
            force_db_name: false,
            ..RoleConfig::default()
        }],
        proxy: ProxySettings::default(),
        data_plane: node_data_plane(),
        extra_databases: Vec::new(),
        tcp_routes: Vec::new(),
        transparent: transparent.then(|| TransparentSpec {
            pods: vec![PodSpec::new("demo", "app-0", "app")],
            host_identity: None,
            ipv6: false,
            join: false,
            ..TransparentSpec::default()
        }),
        setup_sql: vec![
            "CREATE ROLE app LOGIN".into(),
            "CREATE DATABASE app OWNER app".into(),
        ],
        extra_hba: Vec::new(),
        upstream_reuse: None,
        pg_routes: Vec::new(),
    }
}
