//! CPU time of the tunnel processes, from `/proc/<pid>/stat` (utime + stime, all threads),
//! and their resident memory, from `/proc/<pid>/status`.

use anyhow::{Context, Result};

/// Seconds of CPU (user + system) that process `pid` has used so far.
pub fn seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    // The command name (field 2) may hold spaces and parentheses: fields are counted after
    // the last ')'. utime and stime are fields 14 and 15, i.e. 12 and 13 after field 2.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("unexpected {path}: {text}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("unexpected {path}: {text}"))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(total as f64 / hz)
}

/// Summed CPU seconds of a set of processes.
pub fn total(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|&p| seconds(p)).sum()
}

/// Summed resident set (`VmRSS`, KiB) of a set of processes.
pub fn rss_kib(pids: &[u32]) -> Result<u64> {
    let mut total = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/status");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
        let kib = text
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .with_context(|| format!("no VmRSS in {path}"))?;
        total += kib;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_process_has_a_cpu_time() {
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(super::seconds(std::process::id()).unwrap() >= 0.0);
        // A running test binary is resident: at least a few hundred KiB.
        assert!(super::rss_kib(&[std::process::id()]).unwrap() > 100);
    }
}
