//! db-gateway: passwordless PostgreSQL access for Kubernetes workloads.
//!
//! Layers; a module imports only from its own layer's earlier entries and the layers
//! above it in this list, so there are no import circles:
//! - Ground floor, leaves (import nothing of ours): `pg` (PostgreSQL wire), `pki`, `net`,
//!   `admin`, `ebpf` (the loader of `gateway-ebpf/`), `pod` (the pod vocabulary and its
//!   directory trait), `route` (protocol and destination matching), `telemetry` (metric
//!   names), `localdb`.
//! - Ground floor, on those: `tunnel` (the node–proxy contract: mTLS settings, preamble;
//!   takes `pod`, `route`), `config` (settings only; takes `route`, `pod`, `tunnel`'s record
//!   size, `ebpf`'s defaults), `identity` (cgroup → pod → workload; takes `pod`, `config`,
//!   `pki`, `telemetry`).
//! - Serving the proxy: `policy`, `upstream`, `audit`.
//! - The CA service: `ca` (the node uses its client, `ca::client`).
//! - The wings `node` and `proxy`, which never import each other; `up`, the demo harness.

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
pub mod pod;
pub mod policy;
pub mod proxy;
pub mod route;
pub mod telemetry;
pub mod tunnel;
pub mod up;
pub mod upstream;
