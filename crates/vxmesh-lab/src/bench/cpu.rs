//! CPU time from /proc, in clock ticks ("jiffies"): the whole machine's
//! busy time (/proc/stat) and a process's own (/proc/PID/stat).

use anyhow::{Context, Result};

/// Clock ticks per second.
pub fn clock_tick() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// Busy jiffies of the whole machine from /proc/stat's `cpu` line: user,
/// nice, system, irq, softirq (not idle, iowait, or steal: time the
/// hypervisor gave to other guests).
pub fn busy_jiffies(proc_stat: &str) -> Option<u64> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    Some(f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?)
}

/// utime + stime (jiffies) of a process from its /proc/PID/stat; with
/// `children`, plus cutime + cstime (its children it waited for).
pub fn process_jiffies(stat: &str, children: bool) -> Option<u64> {
    // Fields after the command name, which may hold spaces and ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); utime, stime, cutime, cstime are fields
    // 14 to 17.
    let field = |i: usize| f.get(i - 3)?.parse::<u64>().ok();
    let own = field(14)? + field(15)?;
    Some(if children {
        own + field(16)? + field(17)?
    } else {
        own
    })
}

/// The machine's busy jiffies now.
pub fn machine_jiffies() -> Result<u64> {
    let s = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    busy_jiffies(&s).context("no cpu line in /proc/stat")
}

/// The jiffies of process `pid` now (see [`process_jiffies`]).
pub fn pid_jiffies(pid: u32, children: bool) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat (is the process gone?)"))?;
    process_jiffies(&s, children).with_context(|| format!("parse /proc/{pid}/stat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_parsing() {
        let stat = "cpu  100 5 50 1000 7 3 2 11 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(busy_jiffies(stat), Some(160));
        assert_eq!(busy_jiffies("intr 1 2"), None);
        let p = "4242 (vxmesh) a) S 1 2 3 4 5 6 7 8 9 10 120 30 4 2 20 0 9 0";
        assert_eq!(process_jiffies(p, false), Some(150));
        assert_eq!(process_jiffies(p, true), Some(156));
        assert_eq!(process_jiffies("4242 (x) S 1", false), None);
    }

    #[test]
    fn this_process_has_spent_some_cpu() {
        let mut x = 0u64;
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        assert!(pid_jiffies(std::process::id(), true).unwrap() > 0);
        assert!(machine_jiffies().unwrap() > 0);
    }
}
