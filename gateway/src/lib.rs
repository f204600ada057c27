//! db-gateway: passwordless PostgreSQL access for Kubernetes workloads.
//!
//! Ground floor (imports nothing of ours above it): `pg`, `pki`, `config`, `admin`, `ebpf`,
//! `identity` (which takes `PodMeta` from `tunnel`). Shared by both wings:
//! `tunnel`, `net`. Serving the proxy: `policy`, `upstream`, `audit`. The CA service: `ca`. The
//! wings `node` and `proxy` never import each other. With the cargo feature `harness` (on by
//! default): `harness`, the test and demo harness (`gateway up`), which uses them all.

pub mod admin;
pub mod audit;
pub mod ca;
pub mod config;
pub mod ebpf;
#[cfg(feature = "harness")]
pub mod harness;
pub mod identity;
pub mod net;
pub mod node;
pub mod pg;
pub mod pki;
pub mod policy;
pub mod proxy;
pub mod telemetry;
pub mod tunnel;
pub mod upstream;

// TRANSITION(issue 17): old path, removed after the merge
#[cfg(feature = "harness")]
pub use harness as up;
// TRANSITION(issue 17): old path, removed after the merge
#[cfg(feature = "harness")]
pub use harness::localdb;
