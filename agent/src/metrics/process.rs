//! The standard `process_*` metrics of Prometheus' client libraries, read
//! from `/proc/self` at each scrape (Linux only: elsewhere they are absent),
//! and `sluice_build_info`.
//!
//! CPU and start times are in clock ticks in `/proc`; the tick rate comes
//! from the kernel's auxiliary vector (`AT_CLKTCK`), not an assumed 100.

use std::fmt::Write as _;

/// What one scrape reads from `/proc/self/stat` and `/proc/self/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct ProcSample {
    /// utime + stime, clock ticks.
    cpu_ticks: u64,
    /// Start time after boot, clock ticks.
    start_ticks: u64,
    threads: u64,
    resident_bytes: u64,
    virtual_bytes: u64,
}

/// Fields of `/proc/PID/stat` counted after the parenthesised command name
/// (which may itself hold spaces and parentheses): field 3 (state) is
/// index 0.
fn parse_stat(stat: &str, sample: &mut ProcSample) -> Option<()> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    sample.cpu_ticks = num(11)? + num(12)?;
    sample.threads = num(17)?;
    sample.start_ticks = num(19)?;
    Some(())
}

/// `VmRSS` and `VmSize` of `/proc/PID/status` (in kB there), as bytes.
fn parse_status(status: &str, sample: &mut ProcSample) {
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kib = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok());
        match (key, kib) {
            ("VmRSS", Some(n)) => sample.resident_bytes = n * 1024,
            ("VmSize", Some(n)) => sample.virtual_bytes = n * 1024,
            _ => {}
        }
    }
}

/// `btime` of `/proc/stat`: boot time, seconds since the epoch.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Clock ticks per second of `/proc`'s CPU times.
fn ticks_per_second() -> f64 {
    rustix::param::clock_ticks_per_second().max(1) as f64
}

/// User + system CPU time process `pid` has used so far, in seconds (for
/// `sluice bench`, which reads the gateway's before and after a run).
/// `None` when `/proc/PID/stat` cannot be read (no such process, not
/// Linux) or is not understood.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut s = ProcSample::default();
    parse_stat(&stat, &mut s)?;
    Some(s.cpu_ticks as f64 / ticks_per_second())
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Appends `sluice_build_info` and, where `/proc/self` is readable, the
/// `process_*` families.
pub(crate) fn render(out: &mut String) {
    head(
        out,
        "sluice_build_info",
        "gauge",
        "Always 1; the labels say which build runs.",
    );
    let _ = writeln!(
        out,
        "sluice_build_info{{version=\"{}\",arch=\"{}\",os=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS
    );

    let mut s = ProcSample::default();
    let Some(()) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| parse_stat(&t, &mut s))
    else {
        return;
    };
    parse_status(
        &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
        &mut s,
    );
    let ticks = ticks_per_second();

    head(
        out,
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent, in seconds.",
    );
    let _ = writeln!(
        out,
        "process_cpu_seconds_total {}",
        s.cpu_ticks as f64 / ticks
    );
    head(
        out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
    );
    let _ = writeln!(out, "process_resident_memory_bytes {}", s.resident_bytes);
    head(
        out,
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
    );
    let _ = writeln!(out, "process_virtual_memory_bytes {}", s.virtual_bytes);
    if let Some(boot) = std::fs::read_to_string("/proc/stat")
        .ok()
        .as_deref()
        .and_then(boot_time)
    {
        head(
            out,
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
        );
        let _ = writeln!(
            out,
            "process_start_time_seconds {}",
            boot as f64 + s.start_ticks as f64 / ticks
        );
    }
    head(
        out,
        "process_threads",
        "gauge",
        "OS threads in the process.",
    );
    let _ = writeln!(out, "process_threads {}", s.threads);
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The directory handle being read is one of the entries.
        let open = dir.count().saturating_sub(1);
        head(out, "process_open_fds", "gauge", "Open file descriptors.");
        let _ = writeln!(out, "process_open_fds {open}");
    }
    if let Some(max) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
        head(
            out,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors (the soft limit).",
        );
        let _ = writeln!(out, "process_max_fds {max}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (tokio (x) 1) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    150 25 0 0 20 0 7 0 123456 98765432 2048 18446744073709551615 1 1 0 0 0";
        let mut s = ProcSample::default();
        parse_stat(stat, &mut s).unwrap();
        assert_eq!(s.cpu_ticks, 175);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_ticks, 123_456);
    }

    #[test]
    fn a_truncated_stat_is_refused() {
        assert!(parse_stat("1 (x) S 1 2 3", &mut ProcSample::default()).is_none());
        assert!(parse_stat("no parens", &mut ProcSample::default()).is_none());
    }

    #[test]
    fn status_sizes_are_read_in_bytes() {
        let mut s = ProcSample::default();
        parse_status(
            "Name:\tsluice\nVmSize:\t  100 kB\nVmRSS:\t    9344 kB\nThreads:\t5\n",
            &mut s,
        );
        assert_eq!(s.resident_bytes, 9344 * 1024);
        assert_eq!(s.virtual_bytes, 100 * 1024);
    }

    #[test]
    fn cpu_seconds_are_read_for_a_live_process_only() {
        let spent = cpu_seconds(std::process::id()).unwrap();
        assert!(spent >= 0.0, "{spent}");
        // Above the kernel's pid_max: no such process.
        assert_eq!(cpu_seconds(u32::MAX), None);
    }

    #[test]
    fn boot_time_is_read_from_btime() {
        assert_eq!(
            boot_time("cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
        assert_eq!(boot_time("cpu 1 2 3\n"), None);
    }

    #[test]
    fn this_process_is_rendered_with_plausible_figures() {
        let mut out = String::new();
        render(&mut out);
        assert!(out.contains("sluice_build_info{version=\""), "{out}");
        if cfg!(target_os = "linux") {
            let value = |name: &str| -> f64 {
                out.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name} ")))
                    .unwrap_or_else(|| panic!("{name} missing in {out}"))
                    .parse()
                    .unwrap()
            };
            assert!(value("process_resident_memory_bytes") > 1e5);
            assert!(
                value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes")
            );
            assert!(value("process_open_fds") >= 3.0);
            assert!(value("process_max_fds") >= value("process_open_fds"));
            assert!(value("process_threads") >= 1.0);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            let start = value("process_start_time_seconds");
            assert!(
                start <= now + 1.0 && start > now - 3600.0,
                "{start} vs {now}"
            );
        }
    }
}
