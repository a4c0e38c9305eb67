//! Resident memory and CPU time of a process, from `/proc`.

use crate::BenchError;

/// Clock ticks per second of the `utime`/`stime` fields of `/proc/<pid>/stat`
/// (`USER_HZ`, fixed at 100 by the Linux ABI).
pub const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessSample {
    /// Resident set size (`VmRSS`), bytes.
    pub rss_bytes: u64,
    /// User plus system CPU time so far, seconds.
    pub cpu_seconds: f64,
}

/// Reads `pid`'s resident memory and CPU time.
pub fn sample(pid: u32) -> Result<ProcessSample, BenchError> {
    let io = |error: std::io::Error| BenchError::Io { what: "reading /proc", detail: error.to_string() };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(io)?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(io)?;
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse::<u64>().ok())
        .ok_or_else(|| BenchError::Io { what: "reading /proc", detail: format!("no VmRSS for {pid}") })?;
    Ok(ProcessSample { rss_bytes: rss_kib * 1024, cpu_seconds: cpu_seconds_of_stat(&stat)? })
}

/// Reads the calling process.
pub fn sample_self() -> Result<ProcessSample, BenchError> {
    sample(std::process::id())
}

/// `utime + stime` of a `/proc/<pid>/stat` line, in seconds.
fn cpu_seconds_of_stat(stat: &str) -> Result<f64, BenchError> {
    // The command name (field 2) is in parentheses and may contain spaces;
    // fields are counted after its closing parenthesis.
    let bad = || BenchError::Io { what: "reading /proc", detail: "malformed stat line".to_owned() };
    let after_name = &stat[stat.rfind(')').ok_or_else(bad)? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).ok_or_else(bad)?;
    let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).ok_or_else(bad)?;
    #[allow(clippy::cast_precision_loss)]
    let seconds = (utime + stime) as f64 / CLOCK_TICKS_PER_SECOND;
    Ok(seconds)
}

/// CPU cores a process used on average between two samples `seconds` apart.
pub fn cores_used(before: ProcessSample, after: ProcessSample, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    (after.cpu_seconds - before.cpu_seconds) / seconds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_a_name_with_spaces_and_parentheses() {
        let line = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 0 0";
        assert_eq!(cpu_seconds_of_stat(line).unwrap(), 3.0);
        assert!(cpu_seconds_of_stat("garbage").is_err());
    }

    #[test]
    fn the_own_process_can_be_sampled() {
        let sample = sample_self().unwrap();
        assert!(sample.rss_bytes > 0);
    }
}
