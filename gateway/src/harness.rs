//! The test and demo harness: the whole product on one machine. Compiled only with the cargo
//! feature `harness` (on by default, so `gateway up`, `cargo xtask demo`, the integration tests
//! and the bench work as they are); a production build (`--no-default-features`) has none of
//! it and no `up` command.
//!
//! - [`localdb`]: a throwaway PostgreSQL 15 configured for certificate logins only.
//! - [`spec`]: what a stack is made of ([`StackSpec`], workloads, routes, pods).
//! - [`configs`]: the node's and proxy's configuration for a stack, built from the
//!   [`crate::config`] structs and written as YAML (a renamed field breaks the build).
//! - [`stack`]: starts and stops the processes ([`Stack`]).
//! - [`kernel`] and [`pods`]: the transparent mode's pods, cgroups and addresses (root).
//! - [`demo`]: `gateway up`.
//! - [`rds`] and [`aws`]: Amazon RDS's IAM login in front of the local PostgreSQL, and the
//!   AWS credential endpoints (STS web identity, container credentials) the proxy's
//!   provider chain fetches from.
//! - [`machine`]: free ports, temporary directories, root-or-skip, stopping children: the
//!   one copy the integration tests and the bench use too (re-exported here).

pub mod aws;
pub mod configs;
pub mod demo;
pub mod kernel;
pub mod localdb;
pub mod machine;
pub mod pods;
pub mod rds;
pub mod secrets;
pub mod spec;
pub mod stack;

pub use demo::run;
pub use kernel::Kernel;
pub use machine::{
    can_run_privileged, free_port, in_ci, is_root, loopback, root_or_skip, stop_child,
    stop_children, temp_dir,
};
pub use spec::{
    AGENT_PORT, CA_SERVER_NAME, DB_SERVER_NAME, DEMO_TRUST_DOMAIN, NODE_NAME, NODE_THREADS,
    PROXY_SERVER_NAME, PgRoute, PodSpec, ProxySettings, ROUTE, StackSpec, TcpRoute,
    TransparentSpec, Workload, node_data_plane, role, strings,
};
pub use stack::{Replica, Stack};
