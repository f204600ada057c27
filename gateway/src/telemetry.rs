//! Every metric the gateway exports, by the part of the product that records it: one child
//! module per wing (`node`, `proxy`, `ca`) names its metrics as constants and describes
//! them, so that `/metrics` carries HELP text and the README's table can be checked against a
//! scrape. Ground floor: the code that records a metric imports its name from here, never a
//! string literal.
//!
//! Not named `metrics`, which would shadow the `metrics` crate's macros inside this crate.

pub mod ca;
pub mod identity;
pub mod node;
pub mod proxy;
