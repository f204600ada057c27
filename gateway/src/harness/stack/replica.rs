//! A second proxy process on a running [`Stack`]'s policy and database, with a node agent
//! of its own in front of it: what two proxy replicas behind one Service look like to the
//! database (issue 19: concurrent first sessions of one automatic user from two proxies).
//!
//! The replica's files sit in the stack's directory beside the first proxy's, numbered
//! (`proxy-<n>.yaml`, `proxy-<n>.log`, `audit-<n>.jsonl`, `node-<n>.yaml`, `node-<n>.log`), so
//! the stack's log scan covers them; the workload certificates are the stack's own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;

use anyhow::Result;

use super::super::configs::{self, write_yaml};
use super::super::machine::{loopback, stop_child};
use super::{STOP_GRACE, Stack, read_audit, wait_for_startup};

/// A second proxy and its node; dropping it stops both (before the stack's database).
pub struct Replica {
    pub proxy: Option<Child>,
    pub node: Option<Child>,
    pub proxy_admin: SocketAddr,
    pub node_admin: SocketAddr,
    /// Node listener per workload, in the order of the stack's workloads.
    pub listeners: Vec<SocketAddr>,
    pub audit_path: PathBuf,
}

impl Stack {
    /// Starts replica `n` (2, 3, …): a proxy with the stack's configuration but its own
    /// audit log, and a node whose listeners (one per workload, as the stack's) go to it.
    pub fn start_replica(&self, n: usize) -> Result<Replica> {
        let mut proxy_cfg = configs::proxy_config(&self.spec, self.pg.port);
        proxy_cfg.audit.path = format!("audit-{n}.jsonl");
        let proxy_yaml = self.dir.join(format!("proxy-{n}.yaml"));
        write_yaml(&proxy_yaml, &proxy_cfg)?;
        let (proxy, proxy_admin, listening) = self.spawn_started(
            &format!("proxy-{n}"),
            &["proxy", "--config", &proxy_yaml.to_string_lossy()],
            1,
        )?;
        let mut replica = Replica {
            proxy: Some(proxy),
            node: None,
            proxy_admin,
            node_admin: loopback(0),
            listeners: Vec::new(),
            audit_path: self.dir.join(format!("audit-{n}.jsonl")),
        };
        let node_cfg = configs::node_config(&self.spec, listening[0], None, loopback(0));
        let node_yaml = self.dir.join(format!("node-{n}.yaml"));
        write_yaml(&node_yaml, &node_cfg)?;
        let log = format!("node-{n}");
        let mut node =
            self.spawn_args(&log, &["node", "--config", &node_yaml.to_string_lossy()])?;
        let started = wait_for_startup(
            &self.dir.join(format!("{log}.log")),
            &log,
            &mut node,
            self.spec.workloads.len(),
        );
        replica.node = Some(node);
        let (node_admin, listeners) = started?;
        replica.node_admin = node_admin;
        replica.listeners = listeners;
        Ok(replica)
    }
}

impl Replica {
    /// A libpq connection string for workload `i` through this replica's node.
    pub fn conn_string(&self, i: usize, user: &str, dbname: &str) -> String {
        let a = self.listeners[i];
        format!(
            "host={} port={} user={user} dbname={dbname} sslmode=disable",
            a.ip(),
            a.port()
        )
    }

    /// This proxy's audit events, once its writer has written what it queued (as
    /// [`Stack::audit_events`]).
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        read_audit(
            &self.audit_path,
            self.proxy.is_some().then_some(self.proxy_admin),
        )
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        for c in [self.node.as_mut(), self.proxy.as_mut()]
            .into_iter()
            .flatten()
        {
            stop_child(c, STOP_GRACE);
        }
    }
}
