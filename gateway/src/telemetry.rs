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
    use super::Zeros;

    /// Runs `describe` against a fresh recorder and renders the scrape.
    pub fn scrape_after(describe: fn()) -> String {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, describe);
        recorder.handle().render()
    }

    /// Every name has HELP, every name that is not a histogram is registered at zero, and
    /// every zero series is in the scrape.
    pub fn assert_described(text: &str, names: &[&str], histograms: &[&str], zeros: &Zeros) {
        for &name in names.iter().filter(|n| !histograms.contains(n)) {
            assert!(
                text.contains(&format!("# HELP {name} ")),
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
