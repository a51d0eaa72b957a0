//! What the harness reads about processes on this machine from Linux's `/proc`: its own
//! CPU time (so a saturated generator shows in the report), a server's CPU time and its
//! resident memory. Elsewhere these read as absent.

use std::time::Instant;

/// `/proc/<pid>/stat` counts CPU time in clock ticks of `USER_HZ`, which Linux fixes at 100
/// for user space on every architecture it supports.
const TICKS_PER_SECOND: f64 = 100.0;

/// This process's user + system CPU seconds so far.
pub fn cpu_seconds() -> Option<f64> {
    let t = parse_cpu_times(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    Some(t.user + t.system)
}

/// User and system CPU seconds a process has used so far. The process's figures in
/// `/proc/<pid>/stat` cover all its threads, live and exited (not its waited-for children).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
}

impl CpuTimes {
    /// What was used between `self` (earlier) and `later`.
    pub fn until(self, later: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: (later.user - self.user).max(0.0),
            system: (later.system - self.system).max(0.0),
        }
    }

    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

/// The summed CPU times of `pids` (several nodes on this machine); `None` when any of them
/// cannot be read.
pub fn cpu_times(pids: &[u32]) -> Option<CpuTimes> {
    let mut sum = CpuTimes::default();
    for pid in pids {
        let t = parse_cpu_times(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
        sum.user += t.user;
        sum.system += t.system;
    }
    Some(sum)
}

/// utime and stime of a `/proc/<pid>/stat` line.
fn parse_cpu_times(stat: &str) -> Option<CpuTimes> {
    // The command name (field 2) is in parentheses and may hold spaces: start after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(CpuTimes {
        user: utime / TICKS_PER_SECOND,
        system: stime / TICKS_PER_SECOND,
    })
}

/// A process's resident memory (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Where the server's resident memory is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemorySource {
    /// `/proc/<pid>/status` of servers on this machine (several nodes: summed).
    Pids(Vec<u32>),
    /// The `process_resident_memory_bytes` gauge of a node's `GET /metrics` (plain http).
    Metrics(String),
}

impl MemorySource {
    /// The server's resident memory now, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        match self {
            MemorySource::Pids(pids) => pids.iter().map(|&pid| rss_kib(pid)).sum(),
            // A blocking GET, a few times per run: keep it off the runtime's workers.
            MemorySource::Metrics(url) => match tokio::runtime::Handle::try_current() {
                Ok(handle)
                    if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread =>
                {
                    tokio::task::block_in_place(|| metrics_rss_kib(url))
                }
                _ => metrics_rss_kib(url),
            },
        }
    }
}

/// Reads `process_resident_memory_bytes` from a `/metrics` URL with a blocking HTTP/1.0 GET:
/// called a few times per run (start, connected, end), never on the measured path.
fn metrics_rss_kib(url: &str) -> Option<u64> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    use std::time::Duration;
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let addr = authority.to_socket_addrs().ok()?.next()?;
    let timeout = Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    let bytes: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))?
        .trim()
        .parse::<f64>()
        .ok()? as u64;
    Some(bytes / 1024)
}

/// Cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU use between two points, as a share of all cores.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    wall: Instant,
    cpu: Option<f64>,
}

impl CpuMeter {
    pub fn start() -> CpuMeter {
        CpuMeter {
            wall: Instant::now(),
            cpu: cpu_seconds(),
        }
    }

    /// (CPU seconds used, wall seconds, percent of all cores) since `start`.
    pub fn read(&self) -> (Option<f64>, f64, Option<f64>) {
        let wall = self.wall.elapsed().as_secs_f64();
        let used = match (self.cpu, cpu_seconds()) {
            (Some(a), Some(b)) => Some((b - a).max(0.0)),
            _ => None,
        };
        let percent = used
            .filter(|_| wall > 0.0)
            .map(|u| 100.0 * u / wall / cores() as f64);
        (used, wall, percent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_host_reads_this_process() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            return;
        }
        assert!(cpu_seconds().is_some());
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        let me = std::process::id();
        let one = cpu_times(&[me]).unwrap();
        // Two pids are summed (times only grow).
        let two = cpu_times(&[me, me]).unwrap();
        assert!(two.total() >= 2.0 * one.total());
        assert_eq!(cpu_times(&[me, u32::MAX]), None);
        assert_eq!(
            MemorySource::Pids(vec![me, me])
                .rss_kib()
                .map(|kib| kib > 0),
            Some(true)
        );
    }

    #[test]
    fn test_host_parses_cpu_times_after_a_command_with_spaces() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime ...
        let stat = "42 (tandem serve) S 1 42 42 0 -1 4194560 10 0 0 0 250 75 0 0 20 0";
        let t = parse_cpu_times(stat).unwrap();
        assert_eq!(
            t,
            CpuTimes {
                user: 2.5,
                system: 0.75
            }
        );
        let used = CpuTimes {
            user: 1.0,
            system: 0.5,
        }
        .until(t);
        assert_eq!(
            used,
            CpuTimes {
                user: 1.5,
                system: 0.25
            }
        );
        assert_eq!(used.total(), 1.75);
        assert_eq!(parse_cpu_times("garbage"), None);
    }
}
