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

/// What a metric is to Prometheus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric: its name, kind, the HELP text `/metrics` shows for it, and for a labelled
/// counter its label with every value the code records. Each child module lists its
/// metrics as `METRICS`; the README's metric table is checked against them.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub label: Option<(&'static str, &'static [&'static str])>,
}

impl Metric {
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self::new(name, Kind::Counter, help)
    }

    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self::new(name, Kind::Gauge, help)
    }

    pub const fn histogram(name: &'static str, help: &'static str) -> Self {
        Self::new(name, Kind::Histogram, help)
    }

    const fn new(name: &'static str, kind: Kind, help: &'static str) -> Self {
        Self {
            name,
            kind,
            help,
            label: None,
        }
    }

    /// The same metric with one label, recorded with exactly these values.
    pub const fn labelled(self, label: &'static str, values: &'static [&'static str]) -> Self {
        Self {
            label: Some((label, values)),
            ..self
        }
    }
}

/// Gives each metric its HELP text and registers its series at zero, so that a scrape
/// (and an alert on a rate) has them before they first move: every value of a labelled
/// counter. A histogram has no series before its first value. Call once per process,
/// after the recorder is installed; `increment(0)` keeps a value recorded meanwhile.
pub fn describe_all(list: &[Metric]) {
    for m in list {
        match (m.kind, m.label) {
            (Kind::Counter, None) => {
                metrics::describe_counter!(m.name, m.help);
                metrics::counter!(m.name).increment(0);
            }
            (Kind::Counter, Some((label, values))) => {
                metrics::describe_counter!(m.name, m.help);
                for &value in values {
                    metrics::counter!(m.name, label => value).increment(0);
                }
            }
            (Kind::Gauge, _) => {
                metrics::describe_gauge!(m.name, m.help);
                metrics::gauge!(m.name).increment(0.0);
            }
            (Kind::Histogram, _) => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::{Kind, Metric};

    /// Runs `describe` against a fresh recorder and renders the scrape.
    pub fn scrape_after(describe: fn()) -> String {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, describe);
        recorder.handle().render()
    }

    /// Every metric that is not a histogram has its HELP text and every one of its series
    /// at zero in the scrape.
    pub fn assert_described(text: &str, list: &[Metric]) {
        for m in list.iter().filter(|m| m.kind != Kind::Histogram) {
            let name = m.name;
            assert!(
                text.contains(&format!("# HELP {name} {}", m.help)),
                "no HELP for {name}:\n{text}"
            );
            let series: Vec<String> = match m.label {
                None => vec![format!("{name} 0")],
                Some((label, values)) => values
                    .iter()
                    .map(|v| format!("{name}{{{label}=\"{v}\"}} 0"))
                    .collect(),
            };
            for series in series {
                assert!(text.lines().any(|l| l == series), "no {series}:\n{text}");
            }
        }
    }
}
