//! Per-node rate limits of the CA: a token bucket per node name (taken from the node's
//! verified certificate), so one node (a crash-looping pod, a compromised agent) cannot
//! keep the CA signing for everybody else. A node starting a hundred pods at once fits in
//! the burst; a steady flood gets `429` with `Retry-After`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets kept before full ones (nodes that have been quiet) are forgotten.
const MAX_TRACKED: usize = 10_000;

pub struct NodeLimits {
    /// Requests per second a node may make in the long run.
    rate: f64,
    /// Requests a node may make at once.
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl NodeLimits {
    pub fn new(rate_per_second: f64, burst: u32) -> Self {
        Self {
            rate: rate_per_second.max(0.0),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request of `node`'s now, or says how long until it may ask again.
    pub fn take(&self, node: &str) -> Result<(), Duration> {
        self.take_at(node, Instant::now())
    }

    fn take_at(&self, node: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(node) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| refill(b, now, rate, burst) < burst);
        }
        let b = buckets.entry(node.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = refill(b, now, self.rate, self.burst);
        b.at = now;
        if tokens >= 1.0 {
            b.tokens = tokens - 1.0;
            return Ok(());
        }
        b.tokens = tokens;
        if self.rate == 0.0 {
            return Err(Duration::from_secs(3600));
        }
        Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
    }
}

/// The bucket's tokens at `now`.
fn refill(b: &Bucket, now: Instant, rate: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * rate).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_node() {
        let l = NodeLimits::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.take_at("node-1", t0), Ok(()));
        }
        let wait = l.take_at("node-1", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Another node has a bucket of its own.
        assert_eq!(l.take_at("node-2", t0), Ok(()));
        // Half a second later, one more.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(l.take_at("node-1", t1), Ok(()));
        assert!(l.take_at("node-1", t1).is_err());
        // Quiet for long: back to a full burst, not more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(l.take_at("node-1", t2), Ok(()));
        }
        assert!(l.take_at("node-1", t2).is_err());
    }
}
