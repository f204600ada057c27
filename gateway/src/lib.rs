//! db-gateway: passwordless PostgreSQL access for Kubernetes workloads.
//!
//! Ground floor (imports nothing of ours above it): `pg`, `pki`, `config`, `admin`, `ebpf`,
//! `localdb`, `identity` (which takes `PodMeta` from `tunnel`). Shared by both wings:
//! `tunnel`, `net`. Serving the proxy: `policy`, `upstream`, `audit`. The CA service: `ca`. The
//! wings `node` and `proxy` never import each other.

pub mod admin;
pub mod audit;
pub mod buffer_pool;
pub mod ca;
pub mod config;
pub mod ebpf;
pub mod identity;
pub mod localdb;
pub mod net;
pub mod node;
pub mod pg;
pub mod pki;
pub mod policy;
pub mod proxy;
pub mod telemetry;
pub mod tunnel;
pub mod up;
pub mod upstream;
