//! db-gateway: passwordless PostgreSQL access for Kubernetes workloads.
//!
//! Ground floor (imports nothing of ours above it): `pg`, `pki`, `config`, `admin`, `ebpf`,
//! `localdb`. Shared by both wings: `tunnel`. Serving the proxy: `policy`, `upstream`,
//! `audit`. The wings `node` and `proxy` never import each other.

pub mod admin;
pub mod audit;
pub mod config;
pub mod ebpf;
pub mod localdb;
pub mod node;
pub mod pg;
pub mod pki;
pub mod policy;
pub mod proxy;
pub mod tunnel;
pub mod up;
pub mod upstream;
