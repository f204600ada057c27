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

/// One metric: its name, kind and the HELP text `/metrics` shows for it. Each child module
/// lists its metrics as `METRICS`; the README's metric table is checked against them.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

impl Metric {
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: Kind::Counter,
            help,
        }
    }

    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: Kind::Gauge,
            help,
        }
    }

    pub const fn histogram(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: Kind::Histogram,
            help,
        }
    }
}

/// Gives each metric its HELP text. Call once per process, after the recorder is
/// installed.
pub fn describe_all(list: &[Metric]) {
    for m in list {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// The series a process shows at zero from its start, so that a scrape (and an alert on a
/// rate) has them before they first move. Histograms are not listed: a histogram has no
/// series before its first value.
pub struct Zeros {
    pub counters: &'static [&'static str],
    pub gauges: &'static [&'static str],
    /// Counters with one label: name, label, and every value the code records.
    pub labelled: &'static [(&'static str, &'static str, &'static [&'static str])],
}

impl Zeros {
    /// Registers every series at zero. `increment(0)` rather than a `set`: a value recorded
    /// meanwhile by another thread is kept.
    pub fn register(&self) {
        for &name in self.counters {
            metrics::counter!(name).increment(0);
        }
        for &name in self.gauges {
            metrics::gauge!(name).increment(0.0);
        }
        for &(name, label, values) in self.labelled {
            for &value in values {
                metrics::counter!(name, label => value).increment(0);
            }
        }
    }

    /// Whether `name` is one of the series listed here.
    pub fn lists(&self, name: &str) -> bool {
        self.counters.contains(&name)
            || self.gauges.contains(&name)
            || self.labelled.iter().any(|(n, _, _)| *n == name)
    }
}

/// What a process's `/metrics` shows right after `describe` ran, and the checks every
/// telemetry module's test makes on it.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Kind, Metric, Zeros};

    /// Runs `describe` against a fresh recorder and renders the scrape.
    pub fn scrape_after(describe: fn()) -> String {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, describe);
        recorder.handle().render()
    }

    /// Every metric that is not a histogram has HELP and is registered at zero (a
    /// histogram has no series before its first value), and every zero series is in the
    /// scrape.
    pub fn assert_described(text: &str, list: &[Metric], zeros: &Zeros) {
        for m in list.iter().filter(|m| m.kind != Kind::Histogram) {
            let name = m.name;
            assert!(
                text.contains(&format!("# HELP {name} {}", m.help)),
                "no HELP for {name}:\n{text}"
            );
            assert!(zeros.lists(name), "{name} is not registered at zero");
        }
        for &name in zeros.counters.iter().chain(zeros.gauges) {
            assert!(
                text.lines().any(|l| l == format!("{name} 0")),
                "{name} not at zero:\n{text}"
            );
        }
        for &(name, label, values) in zeros.labelled {
            for value in values {
                let series = format!("{name}{{{label}=\"{value}\"}} 0");
                assert!(text.lines().any(|l| l == series), "no {series}:\n{text}");
            }
        }
    }
}
