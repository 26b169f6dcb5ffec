//! Pinning the processes and threads of a benchmark to CPUs (`sched_setaffinity`), so that one
//! node's agent can be measured on a core of its own while what would run on other machines in
//! a real mesh (other clusters' etcds and agents, a flooding writer) runs on another: on a
//! 2-core machine they otherwise take turns on the same cores, and a probe's every hop waits
//! for one (`make floods`, RELIABILITY.md, session 10).
//!
//! Affinity is per thread: a process is pinned by pinning each of its threads, and threads it
//! starts later inherit the mask of the thread that starts them, which is pinned too. Other
//! processes of the machine (other people's builds) are not touched and still run on both.

use std::mem::MaybeUninit;

use anyhow::Context;

/// Binds thread `tid` (a pid for a process's main thread; 0: the calling thread) to `cpu`.
pub fn pin_thread(tid: u32, cpu: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        cpu < 8 * std::mem::size_of::<libc::cpu_set_t>(),
        "no CPU {cpu}"
    );
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it (cpu is
    // within its size, checked above).
    let set = unsafe {
        let mut set = MaybeUninit::<libc::cpu_set_t>::zeroed().assume_init();
        libc::CPU_SET(cpu, &mut set);
        set
    };
    // SAFETY: plain sched_setaffinity(2) with a set of the size given.
    let r = unsafe {
        libc::sched_setaffinity(
            tid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("sched_setaffinity of thread {tid} to CPU {cpu}"));
    }
    Ok(())
}

/// The thread ids of process `pid` (`/proc/PID/task`), with each thread's name (`comm`).
pub fn threads(pid: u32) -> anyhow::Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    let dir = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that ended meanwhile has no name: skipped.
        if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) {
            out.push((tid, comm.trim().to_owned()));
        }
    }
    Ok(out)
}

/// Binds every thread of process `pid` to `cpu`; how many there were. A thread that ends
/// between the listing and its pinning is skipped.
pub fn pin_process(pid: u32, cpu: usize) -> anyhow::Result<usize> {
    let mut pinned = 0;
    for (tid, _) in threads(pid)? {
        match pin_thread(tid, cpu) {
            Ok(()) => pinned += 1,
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::raw_os_error)
                    == Some(libc::ESRCH) => {}
            Err(e) => return Err(e.context(format!("pinning process {pid}"))),
        }
    }
    anyhow::ensure!(pinned > 0, "process {pid} has no thread left to pin");
    Ok(pinned)
}

/// The CPUs thread `tid` of `pid` may run on (`Cpus_allowed_list`, e.g. `0` or `0-1`): how a
/// placement is checked after the fact.
pub fn allowed_cpus(pid: u32, tid: u32) -> anyhow::Result<String> {
    let path = format!("/proc/{pid}/task/{tid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("no Cpus_allowed_list in {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread pinned to a CPU is seen allowed on that CPU alone, and a thread it starts
    /// inherits that (what pinning a running process relies on).
    #[test]
    fn a_pinned_thread_and_its_children_run_on_its_cpu() {
        let me = std::process::id();
        let (cpu, inherited) = std::thread::spawn(move || {
            // SAFETY: gettid(2) has no preconditions.
            let tid = unsafe { libc::gettid() } as u32;
            pin_thread(0, 0).unwrap();
            let cpu = allowed_cpus(me, tid).unwrap();
            let child = std::thread::spawn(move || {
                // SAFETY: as above.
                let tid = unsafe { libc::gettid() } as u32;
                allowed_cpus(me, tid).unwrap()
            })
            .join()
            .unwrap();
            (cpu, child)
        })
        .join()
        .unwrap();
        assert_eq!(cpu, "0");
        assert_eq!(inherited, "0");
    }
}
