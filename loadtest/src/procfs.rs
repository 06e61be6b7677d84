//! CPU time and memory of processes, from `/proc` and `getrusage(2)`.

use std::fs;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Returns the current `CLOCK_REALTIME` time in nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as i64)
        .unwrap_or(0)
}

/// Returns the user plus system CPU time of process `pid` in nanoseconds,
/// from fields 14 and 15 of `/proc/PID/stat` (clock ticks).
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in field 2 may contain spaces, so count fields from
    // the closing parenthesis: field 3 (state) is the first after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * 1_000_000_000 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// Returns the CPU time of the calling thread in nanoseconds
/// (`getrusage(RUSAGE_THREAD)`, user plus system).
pub fn thread_cpu_ns() -> u64 {
    rusage_ns(libc::RUSAGE_THREAD)
}

/// Returns the CPU time of the whole calling process in nanoseconds
/// (`getrusage(RUSAGE_SELF)`, user plus system).
pub fn process_self_cpu_ns() -> u64 {
    rusage_ns(libc::RUSAGE_SELF)
}

fn rusage_ns(who: libc::c_int) -> u64 {
    // SAFETY: getrusage writes only into the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(who, &mut usage) != 0 {
            return 0;
        }
        usage
    };
    timeval_ns(usage.ru_utime) + timeval_ns(usage.ru_stime)
}

fn timeval_ns(time: libc::timeval) -> u64 {
    time.tv_sec as u64 * 1_000_000_000 + time.tv_usec as u64 * 1000
}

/// Memory of one process at one moment, in KiB.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS` from `/proc/PID/status`.
    pub rss_kib: u64,
    /// `Rss` from `/proc/PID/smaps_rollup`.
    pub rollup_rss_kib: Option<u64>,
    /// `Pss` from `/proc/PID/smaps_rollup`.
    pub pss_kib: Option<u64>,
    /// `Anonymous` from `/proc/PID/smaps_rollup`.
    pub anonymous_kib: Option<u64>,
}

/// Reads the memory of `pid`; `None` when the process does not exist.
pub fn memory(pid: u32) -> Option<Memory> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Some(Memory {
        rss_kib: kib_field(&status, "VmRSS:")?,
        rollup_rss_kib: kib_field(&rollup, "Rss:"),
        pss_kib: kib_field(&rollup, "Pss:"),
        anonymous_kib: kib_field(&rollup, "Anonymous:"),
    })
}

/// Finds `name` at the start of a line and parses the number after it.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_cpu_and_memory_are_readable() {
        let pid = std::process::id();
        assert!(process_cpu_ns(pid).is_some());
        let memory = memory(pid).expect("own /proc entry");
        assert!(memory.rss_kib > 0);
    }

    #[test]
    fn kib_field_reads_named_line() {
        let text = "Rss:                1234 kB\nPss:      99 kB\n";
        assert_eq!(kib_field(text, "Pss:"), Some(99));
        assert_eq!(kib_field(text, "Rss:"), Some(1234));
        assert_eq!(kib_field(text, "Anonymous:"), None);
    }

    #[test]
    fn thread_cpu_grows_with_work() {
        let before = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_ns() > before);
    }
}
