//! What the benchmark reads from Linux's `/proc` about itself: memory, CPU time per group of
//! threads, and UDP drop counters. Every reader returns zeros where a file is missing, so
//! the benchmark still runs (with less to say) elsewhere.

use std::collections::BTreeMap;
use std::fs;

/// Resident memory of the process, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Memory {
    /// `VmRSS`: now.
    pub rss: u64,
    /// `VmHWM`: the peak so far.
    pub peak: u64,
}

/// Reads `/proc/self/status`.
pub fn memory() -> Memory {
    let text = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    Memory {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
    }
}

/// CPU time spent on-CPU by each group of threads, in nanoseconds, keyed by the first
/// `prefix` of [`THREAD_GROUPS`] the thread's name starts with (else `"other"`).
pub type CpuByGroup = BTreeMap<&'static str, u64>;

/// Thread-name prefixes and the group they count towards. The benchmark names its runtimes'
/// threads; sqlx runs each SQLite connection on a thread of its own.
pub const THREAD_GROUPS: [(&str, &str); 3] = [
    ("ml-coord", "coordinator"),
    ("sqlx-sqlite", "coordinator"),
    ("ml-agents", "agents"),
];

/// Sums the first field of `/proc/self/task/*/schedstat` (time on CPU, ns) per group. A
/// thread that ended since the last call no longer counts, so call it when the set of
/// threads is stable.
pub fn cpu() -> CpuByGroup {
    let mut out = CpuByGroup::new();
    let Ok(tasks) = fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let comm = fs::read_to_string(path.join("comm")).unwrap_or_default();
        let ns = fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let group = THREAD_GROUPS
            .iter()
            .find(|(prefix, _)| comm.starts_with(prefix))
            .map_or("other", |(_, g)| g);
        *out.entry(group).or_default() += ns;
    }
    out
}

/// `later - earlier` per group.
pub fn cpu_since(later: &CpuByGroup, earlier: &CpuByGroup) -> CpuByGroup {
    later
        .iter()
        .map(|(g, ns)| (*g, ns.saturating_sub(earlier.get(g).copied().unwrap_or(0))))
        .collect()
}

/// Time on CPU of process `root` and of its children, in nanoseconds: the first field of
/// each one's `/proc/PID/schedstat` (its main thread). Meant for a PostgreSQL server, whose
/// postmaster and backends are single-threaded processes; a child that ended since the last
/// call no longer counts. Zero when `root` is gone.
pub fn process_tree_cpu(root: u32) -> u64 {
    let on_cpu = |pid: u32| {
        fs::read_to_string(format!("/proc/{pid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let Ok(procs) = fs::read_dir("/proc") else {
        return 0;
    };
    let children = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| parent(*pid) == Some(root));
    on_cpu(root) + children.map(on_cpu).sum::<u64>()
}

/// The parent of process `pid` (`/proc/PID/stat`, the field after the parenthesised name).
fn parent(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The UDP counters of the network namespace (`/proc/net/snmp`, the `Udp:` lines) that say
/// datagrams were dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UdpDrops {
    /// `RcvbufErrors`: dropped because a socket's receive buffer was full.
    pub rcvbuf_errors: u64,
    /// `SndbufErrors`.
    pub sndbuf_errors: u64,
    /// `InErrors` (includes `RcvbufErrors`).
    pub in_errors: u64,
}

impl UdpDrops {
    /// `self - earlier`.
    pub fn since(&self, earlier: &UdpDrops) -> UdpDrops {
        UdpDrops {
            rcvbuf_errors: self.rcvbuf_errors.saturating_sub(earlier.rcvbuf_errors),
            sndbuf_errors: self.sndbuf_errors.saturating_sub(earlier.sndbuf_errors),
            in_errors: self.in_errors.saturating_sub(earlier.in_errors),
        }
    }
}

/// Reads `/proc/net/snmp`.
pub fn udp_drops() -> UdpDrops {
    let text = fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return UdpDrops::default();
    };
    let table: BTreeMap<&str, u64> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter_map(|(n, v)| Some((n, v.parse().ok()?)))
        .collect();
    let get = |k: &str| table.get(k).copied().unwrap_or(0);
    UdpDrops {
        rcvbuf_errors: get("RcvbufErrors"),
        sndbuf_errors: get("SndbufErrors"),
        in_errors: get("InErrors"),
    }
}

/// Datagrams dropped so far by each IPv4 UDP socket of the network namespace, by local port
/// (the `drops` column of `/proc/net/udp`; cumulative over the socket's life). Tells the
/// coordinator's socket from the agents' ones.
pub fn udp_drops_by_port() -> BTreeMap<u16, u64> {
    let text = fs::read_to_string("/proc/net/udp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = u16::from_str_radix(fields.get(1)?.split(':').nth(1)?, 16).ok()?;
            let drops = fields.get(12)?.parse::<u64>().ok()?;
            Some((port, drops))
        })
        .fold(BTreeMap::new(), |mut map, (port, drops)| {
            *map.entry(port).or_default() += drops;
            map
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let m = memory();
        assert!(m.rss > 0 && m.peak >= m.rss);
        let c = cpu();
        assert!(c.values().sum::<u64>() > 0);
        assert_eq!(
            parent(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
        assert!(process_tree_cpu(std::process::id()) > 0);
    }
}
