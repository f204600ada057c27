//! db-gateway: passwordless PostgreSQL access for Kubernetes workloads.
//!
//! Layers; a module imports only from its own layer's earlier entries and the layers
//! above it in this list, so there are no import circles (`tests/layers.rs` checks it):
//! - Ground floor, leaves (import nothing of ours): `pg` (PostgreSQL wire), `pki`, `net`,
//!   `admin`, `ebpf` (the loader of `gateway-ebpf/`), `pod` (the pod vocabulary and its
//!   directory trait), `route` (protocol and destination matching), `telemetry` (metric
//!   names and descriptions), `buffer_pool` (the data planes' per-thread buffers).
//! - Ground floor, on those: `tunnel` (the node–proxy contract: mTLS settings, preamble;
//!   takes `pod`, `route`), `config` (settings only; takes `route`, `pod`, `tunnel`'s record
//!   size, `ebpf`'s defaults), `identity` (cgroup → pod → workload; takes `pod`, `config`,
//!   `pki`, `telemetry`).
//! - Serving the proxy: `policy`, `upstream`, `audit`.
//! - The CA service: `ca` (the node uses its client, `ca::client`).
//! - The wings `node` and `proxy`, which never import each other.
//! - With the cargo feature `harness` (on by default; the release image builds without it):
//!   `harness`, the test and demo harness behind `gateway up`, which uses them all.

pub mod admin;
pub mod audit;
pub mod buffer_pool;
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
pub mod pod;
pub mod policy;
pub mod proxy;
pub mod route;
pub mod telemetry;
pub mod tunnel;
pub mod upstream;
