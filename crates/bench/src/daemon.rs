//! Starting and stopping `ocmd`, reading its bound addresses from stderr, scraping its
//! `/metrics`, and reading its memory use from `/proc` and its CPU time from its CPU-time
//! clock (`/proc` if that clock is refused).
//!
//! The daemon runs as `ocmd --config CONFIG --tcp 127.0.0.1:0 --udp 127.0.0.1:0 --state
//! DIR/room_manager.json --metrics 127.0.0.1:0`; the bench waits for the line
//! `listening tcp=ADDR udp=ADDR metrics=ADDR`. The bench config logs at `warn`, which would hide
//! that `info` line, so `RUST_LOG` lifts just the event loop's and the journal
//! writer's (`persist`) targets to `info`.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};

/// How long the daemon may take to print its listening line (a 100k-token state loads first).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a SIGTERM'd daemon may take to flush and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Daemon stderr lines kept for error reports.
const LOG_LINES_KEPT: usize = 40;
/// `RUST_LOG` for the child: warnings, plus the lifecycle lines the bench reads.
const CHILD_RUST_LOG: &str = "warn,ocm_server::event_loop=info,ocm_server::persist=info";
/// statfs magic of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Where and how to start daemons.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The `ocmd` binary.
    pub ocmd: PathBuf,
    /// The configuration file.
    pub config: PathBuf,
    /// Parent of the per-daemon state directories.
    pub state_root: PathBuf,
    /// The niceness daemons start at: one this process may set (see [`settable_nice`]).
    pub nice: i32,
}

/// `wanted` when this process may start a process at that niceness, else 0. Linux keeps the
/// niceness per thread, so a throw-away thread tries it on itself.
pub fn settable_nice(wanted: i32) -> std::result::Result<i32, String> {
    if wanted == 0 {
        return Ok(0);
    }
    let attempt = thread::spawn(move || {
        // SAFETY: plain system calls on this thread's own id.
        let rc =
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, wanted) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    })
    .join();
    match attempt {
        Ok(Ok(())) => Ok(wanted),
        Ok(Err(e)) => Err(format!(
            "cannot start ocmd at nice {wanted} ({e}): it runs at 0, level with the load generator"
        )),
        Err(_) => Err("the niceness probe thread panicked".into()),
    }
}

/// A state directory removed on drop.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// A fresh, empty directory under `root`.
    pub fn new(root: &Path) -> Result<StateDir> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = root.join(format!("run-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).ctx(format!("create {}", path.display()))?;
        Ok(StateDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state file the daemon is told to use.
    pub fn state_file(&self) -> PathBuf {
        self.path.join("room_manager.json")
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether `path` is on tmpfs (where fsync is free and durability numbers mean nothing).
pub fn is_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == TMPFS_MAGIC
    }
}

/// What `/proc/PID/status` says of a process.
#[derive(Debug, Clone, Copy)]
pub struct ProcessStatus {
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `Threads`.
    pub threads: u64,
}

/// A running `ocmd`; killed and reaped on drop.
pub struct Daemon {
    child: Option<Child>,
    /// Bound TCRP address.
    pub tcp: SocketAddr,
    /// Bound UCRP address.
    pub udp: SocketAddr,
    /// Bound metrics address.
    pub metrics: SocketAddr,
    /// Time from spawn to the listening line.
    pub startup: Duration,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Launcher {
    /// Starts a daemon on free loopback ports with its state in `dir`.
    pub fn spawn(&self, dir: &StateDir) -> Result<Daemon> {
        let started = Instant::now();
        let mut command = Command::new(&self.ocmd);
        let nice = self.nice;
        let parent = std::process::id();
        // SAFETY: the closure makes raw system calls only and builds io::Errors from errno
        // values, allocating nothing, as code between fork and exec must.
        unsafe {
            command.pre_exec(move || {
                // The daemon gets SIGTERM (and shuts down cleanly) when this process dies,
                // however it dies: an interrupted run leaves no `ocmd` behind. If this
                // process died before the prctl, the daemon is not started at all.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                // `settable_nice` checked that this can succeed; if it does not, the spawn
                // fails rather than the report claiming a niceness the daemon does not have.
                if nice != 0 && libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .arg("--config")
            .arg(&self.config)
            .args(["--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0"])
            .arg("--state")
            .arg(dir.state_file())
            .args(["--metrics", "127.0.0.1:0"])
            .env("RUST_LOG", CHILD_RUST_LOG)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ctx(format!("spawn {}", self.ocmd.display()))?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        if let Some(stderr) = child.stderr.take() {
            let log = Arc::clone(&log);
            thread::spawn(move || read_stderr(stderr, &log, &tx));
        }
        let daemon_log = |log: &Arc<Mutex<VecDeque<String>>>| joined(log);
        let line = match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(Error::DaemonStart {
                    reason: format!("no listening line within {STARTUP_TIMEOUT:?} ({status})"),
                    log: daemon_log(&log),
                });
            }
        };
        let startup = started.elapsed();
        let addr = |key: &str| -> Result<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| Error::DaemonStart {
                    reason: format!("no {key}ADDR in {line:?}"),
                    log: joined(&log),
                })
        };
        let (tcp, udp, metrics) = (addr("tcp=")?, addr("udp=")?, addr("metrics=")?);
        Ok(Daemon {
            child: Some(child),
            tcp,
            udp,
            metrics,
            startup,
            log,
        })
    }
}

fn joined(log: &Mutex<VecDeque<String>>) -> String {
    log.lock()
        .map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

/// Keeps the last lines of the daemon's stderr and hands over the listening line.
fn read_stderr(stderr: impl Read, log: &Mutex<VecDeque<String>>, listening: &mpsc::Sender<String>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if line.contains("listening tcp=") {
            let _ = listening.send(line.clone());
        }
        if let Ok(mut log) = log.lock() {
            if log.len() == LOG_LINES_KEPT {
                log.pop_front();
            }
            log.push_back(line);
        }
    }
}

/// What the scheduler says of one thread, or of the threads of one name, so far
/// (`/proc/PID/task/TID/schedstat`): time on a CPU and time runnable but waiting for one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadTimes {
    /// Nanoseconds on a CPU.
    pub run_ns: u64,
    /// Nanoseconds runnable and waiting for a CPU (the run queue).
    pub wait_ns: u64,
}

/// Each thread's [`ThreadTimes`] in the process whose `/proc` directory is `proc_dir`, summed
/// by thread name (`comm`); empty where the kernel keeps no schedstat (`CONFIG_SCHED_INFO`
/// off) or the process is gone. Threads that end between two reads drop out of the second.
pub fn thread_times_of(proc_dir: &Path) -> BTreeMap<String, ThreadTimes> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(proc_dir.join("task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.path().join("comm")),
            std::fs::read_to_string(task.path().join("schedstat")),
        ) else {
            continue;
        };
        let mut fields = stat.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(run_ns)), Some(Ok(wait_ns))) = (fields.next(), fields.next()) else {
            continue;
        };
        let sum: &mut ThreadTimes = by_name.entry(comm.trim().to_owned()).or_default();
        sum.run_ns += run_ns;
        sum.wait_ns += wait_ns;
    }
    by_name
}

impl Daemon {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Its threads' times on and waiting for a CPU so far, by thread name
    /// ([`thread_times_of`]).
    pub fn thread_times(&self) -> BTreeMap<String, ThreadTimes> {
        thread_times_of(&PathBuf::from(format!("/proc/{}", self.pid())))
    }

    /// Fails if the daemon has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(Error::DaemonExited {
                    status: status.to_string(),
                    log: joined(&self.log),
                });
            }
        }
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit (the daemon flushes its state first).
    pub fn stop(&mut self) -> Result<Duration> {
        let Some(mut child) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        let started = Instant::now();
        let pid = libc::pid_t::try_from(child.id()).unwrap_or(0);
        // SAFETY: plain kill(2) on our own child's pid, which we have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        while started.elapsed() < STOP_TIMEOUT {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(started.elapsed()),
                Ok(Some(status)) => {
                    return Err(Error::DaemonExited {
                        status: format!("{status} after SIGTERM"),
                        log: joined(&self.log),
                    })
                }
                Ok(None) => thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e).ctx("wait for ocmd"),
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(Error::DaemonExited {
            status: format!("did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed"),
            log: joined(&self.log),
        })
    }

    /// Reads `/metrics`.
    pub fn scrape(&self) -> Result<Scrape> {
        let err = |reason: String| Error::Metrics {
            addr: self.metrics,
            reason,
        };
        let mut stream = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(5))
            .map_err(|e| err(e.to_string()))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| err(e.to_string()))?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .map_err(|e| err(e.to_string()))?;
        let mut text = String::new();
        stream
            .read_to_string(&mut text)
            .map_err(|e| err(e.to_string()))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .ok_or_else(|| err("no HTTP body".into()))?;
        Ok(Scrape::parse(body))
    }

    /// Resident memory, KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(&self) -> Result<u64> {
        Ok(self.status()?.rss_kib)
    }

    /// Resident size and thread count, from `/proc/PID/status` (0 for a field not there).
    pub fn status(&self) -> Result<ProcessStatus> {
        let path = format!("/proc/{}/status", self.pid());
        let text = std::fs::read_to_string(&path).ctx(format!("read {path}"))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(ProcessStatus {
            rss_kib: field("VmRSS:"),
            threads: field("Threads:"),
        })
    }

    /// Sends `signal` to the daemon (nothing once it has been reaped).
    pub fn signal(&self, signal: libc::c_int) {
        let Some(pid) = self
            .child
            .as_ref()
            .and_then(|c| libc::pid_t::try_from(c.id()).ok())
        else {
            return;
        };
        if pid > 0 {
            // SAFETY: plain kill(2) on our own child's pid, which is not reaped yet (the
            // child is still held).
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// CPU time used so far by all its threads, to the nanosecond (the process's CPU-time
    /// clock); from `/proc/PID/stat` in clock ticks (10 ms) if that clock is refused.
    pub fn cpu_time(&self) -> Duration {
        let pid = self.pid();
        let mut clock: libc::clockid_t = 0;
        let rc = libc::pid_t::try_from(pid).map_or(-1, |pid| {
            // SAFETY: writes the clock id into `clock`, a valid location.
            unsafe { libc::clock_getcpuclockid(pid, &mut clock) }
        });
        if rc == 0 {
            if let Some(t) = clock_time(clock) {
                return t;
            }
        }
        cpu_time_of(&format!("/proc/{pid}/stat"))
    }
}

impl Daemon {
    /// CPU time used so far by the daemon's event loop (its main thread), to the nanosecond
    /// (`/proc/PID/task/PID/schedstat`); `None` where the kernel keeps no such count.
    pub fn loop_cpu_time(&self) -> Option<Duration> {
        let pid = self.pid();
        let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/schedstat")).ok()?;
        let nanos = text.split_whitespace().next()?.parse().ok()?;
        Some(Duration::from_nanos(nanos))
    }
}

/// CPU time used so far by all of this process's threads, to the nanosecond.
pub fn own_cpu_time() -> Duration {
    clock_time(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap_or_else(|| cpu_time_of("/proc/self/stat"))
}

fn clock_time(clock: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into `ts`, a valid timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

fn cpu_time_of(path: &str) -> Duration {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some((_, rest)) = text.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
    Duration::from_micros(ticks * 1_000_000 / hz)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One `/metrics` reading: every sample line, keyed by its name with labels.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// Parses Prometheus text.
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                Some((key.to_owned(), value.trim().parse().ok()?))
            })
            .collect();
        Scrape { samples }
    }

    /// The sum of a family over all its labels (0 when absent).
    pub fn total(&self, family: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix(family)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// A Prometheus histogram's growth since `before`: `(upper bound, cumulative count)` per
    /// bucket, smallest bound first (`+Inf` as infinity).
    pub fn histogram_delta(&self, before: &Scrape, family: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{family}_bucket{{le=\"");
        let mut buckets: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter_map(|(k, v)| {
                let bound = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().ok()?
                };
                Some((bound, v - before.samples.get(k).copied().unwrap_or(0.0)))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }

    /// Each labelled sample of a family whose value grew since `before`, as `labels=delta`.
    pub fn grown(&self, before: &Scrape, family: &str) -> Vec<String> {
        self.samples
            .iter()
            .filter_map(|(k, v)| {
                let labels = k.strip_prefix(family)?.strip_prefix('{')?;
                let delta = v - before.samples.get(k).copied().unwrap_or(0.0);
                (delta > 0.0).then(|| format!("{}={delta}", labels.trim_end_matches('}')))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_niceness_probe_succeeds_for_a_raise_and_leaves_the_caller_alone() {
        // SAFETY: reads this thread's own niceness.
        let own = || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        let before = own();
        // Raising the niceness needs no privilege, so the probe must say it can be done.
        assert_eq!(settable_nice(before + 3), Ok(before + 3));
        assert_eq!(own(), before, "the probe ran on its own thread");
    }

    #[test]
    fn thread_times_are_summed_by_name_and_unreadable_tasks_skipped() {
        let dir = std::env::temp_dir().join(format!("ocm-bench-tasks-{}", std::process::id()));
        for (tid, comm, schedstat) in [
            ("10", "ocmd\n", "1000 200 5\n"),
            ("11", "ocmd-writer\n", "300 40 7\n"),
            ("12", "ocmd-writer\n", "30 4 1\n"),
            ("13", "ocmd-compactor\n", "not numbers\n"),
        ] {
            let task = dir.join("task").join(tid);
            std::fs::create_dir_all(&task).unwrap();
            std::fs::write(task.join("comm"), comm).unwrap();
            std::fs::write(task.join("schedstat"), schedstat).unwrap();
        }
        let times = thread_times_of(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let expected = BTreeMap::from([
            (
                "ocmd".to_owned(),
                ThreadTimes {
                    run_ns: 1000,
                    wait_ns: 200,
                },
            ),
            (
                "ocmd-writer".to_owned(),
                ThreadTimes {
                    run_ns: 330,
                    wait_ns: 44,
                },
            ),
        ]);
        assert_eq!(times, expected);
        assert!(thread_times_of(&dir).is_empty(), "a process that is gone");
    }

    #[test]
    fn this_process_has_run_by_its_schedstat() {
        let times = thread_times_of(Path::new("/proc/self"));
        if times.is_empty() {
            // A kernel without CONFIG_SCHED_INFO keeps no schedstat: nothing to read here.
            assert!(!Path::new("/proc/self/schedstat").exists());
            return;
        }
        assert!(times.values().any(|t| t.run_ns > 0), "{times:?}");
    }
}
