//! Real-time priority for the agent's threads, given up while the agent is overloaded.
//!
//! Under a bulk transfer the host's CPUs are busy (the application, its TCP stack, the agent's
//! own loops), and a ping or an interactive packet waits for the agent's thread that should
//! carry it to be scheduled: measured on the 2-core bench, the reply's path through the idle
//! send loop took 1.3 ms on average, and the whole round trip 3.2 ms, almost none of it in a
//! queue. Kernel WireGuard runs in softirq context, ahead of every thread; the agent's threads
//! take the lowest real-time priority (`SCHED_RR` 1) instead, so that they run as soon as a
//! packet arrives: the same ping then took 0.45 ms at a higher throughput (BENCHMARKS.md).
//!
//! Real time must not cost the host its other work. A thread of the agent that has not slept
//! once for [`SATURATED_TICKS`] checks in a row while runnable all along is past what it can
//! carry (a flood, or more traffic than a core can encrypt); then every thread of the agent
//! drops to normal priority for [`COOLDOWN`], sharing the CPUs fairly, and takes real time back
//! after. A loaded agent with spare capacity sleeps hundreds of times a second and is never
//! released. The kernel's own limit on real-time threads (`kernel.sched_rt_runtime_us`, 95 %)
//! stays below that.
//!
//! `MESHLINK_SCHEDULING=normal` keeps the agent at normal priority. Without `CAP_SYS_NICE` the
//! agent says so once and runs at normal priority.
//!
//! The project's unsafe code lives here: `sched_setscheduler(2)`, which neither the standard
//! library nor nix wraps.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The real-time priority of the agent's threads: the lowest, below any real-time thread an
/// administrator runs.
const PRIORITY: i32 = 1;
/// The guard's own priority: above the threads it watches, so that it runs when they do not
/// sleep.
const GUARD_PRIORITY: i32 = 2;
/// How often the guard looks at the threads.
pub const TICK: Duration = Duration::from_millis(100);
/// Checks in a row a thread must run through without sleeping to count as overloaded.
pub const SATURATED_TICKS: u32 = 3;
/// A tick in which a thread ran or waited for a CPU at least this share of the time counts as
/// runnable all along.
const BUSY_SHARE: f64 = 0.9;
/// How long the agent stays at normal priority once released.
pub const COOLDOWN: Duration = Duration::from_secs(2);

/// Which priority the agent asks for: `MESHLINK_SCHEDULING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    /// Real time for every runtime thread (the default).
    Realtime,
    /// Normal priority.
    Normal,
}

impl Scheduling {
    /// The scheduling `MESHLINK_SCHEDULING` asks for: `realtime` (also when unset or empty) or
    /// `normal`; anything else is an error naming the variable.
    pub fn from_env_value(value: Option<&str>) -> Result<Scheduling, String> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("realtime") => Ok(Scheduling::Realtime),
            Some("normal") => Ok(Scheduling::Normal),
            Some(other) => Err(format!(
                "MESHLINK_SCHEDULING: {other:?} is not a scheduling (realtime or normal)"
            )),
        }
    }
}

/// A thread's id (`gettid`).
pub type Tid = i32;

/// What the guard reads of a thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Times the thread gave up the CPU to wait (`voluntary_ctxt_switches`).
    pub sleeps: u64,
    /// CPU time the thread has run.
    pub ran: Duration,
    /// Time the thread has waited, runnable, for a CPU.
    pub waited: Duration,
}

/// What the guard needs of the operating system: a small trait, faked in the tests.
pub trait Os {
    /// Puts thread `tid` at real-time priority `priority`, or back to normal (`None`).
    ///
    /// # Errors
    /// The system's, `EPERM` without `CAP_SYS_NICE`.
    fn set_priority(&self, tid: Tid, priority: Option<i32>) -> io::Result<()>;
    /// What thread `tid` of this process has used.
    ///
    /// # Errors
    /// The system's (the thread has exited).
    fn usage(&self, tid: Tid) -> io::Result<Usage>;
}

/// The real system.
#[derive(Debug, Clone, Copy, Default)]
pub struct Linux;

impl Os for Linux {
    fn set_priority(&self, tid: Tid, priority: Option<i32>) -> io::Result<()> {
        // A process the agent starts keeps none of this (SCHED_RESET_ON_FORK).
        let (policy, priority) = match priority {
            Some(p) => (libc::SCHED_RR | libc::SCHED_RESET_ON_FORK, p),
            None => (libc::SCHED_OTHER | libc::SCHED_RESET_ON_FORK, 0),
        };
        let param = libc::sched_param {
            sched_priority: priority,
        };
        // SAFETY: `param` is a valid, initialized `sched_param` that outlives the call, and
        // the kernel only reads it; an invalid `tid` or policy is an error return, not UB.
        let r = unsafe { libc::sched_setscheduler(tid, policy, &param) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn usage(&self, tid: Tid) -> io::Result<Usage> {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))?;
        let sleeps = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| io::Error::other("no voluntary_ctxt_switches in the thread's status"))?;
        // Nanoseconds run, nanoseconds waited on a run queue, time slices.
        let schedstat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))?;
        let mut fields = schedstat
            .split_whitespace()
            .map(|v| v.parse().map(Duration::from_nanos));
        let (Some(Ok(ran)), Some(Ok(waited))) = (fields.next(), fields.next()) else {
            return Err(io::Error::other(
                "no run and wait times in the thread's schedstat",
            ));
        };
        Ok(Usage {
            sleeps,
            ran,
            waited,
        })
    }
}

/// The calling thread's id.
pub fn current_tid() -> Tid {
    nix::unistd::gettid().as_raw()
}

/// What the guard decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A thread is overloaded: every thread to normal priority.
    Release,
    /// The cooldown is over: every thread back to real time.
    Restore,
}

/// The guard's state: a pure state machine, given the time and what the threads used.
#[derive(Debug, Default)]
pub struct Guard {
    /// Per thread: its last reading, and the ticks in a row it ran through without sleeping.
    threads: HashMap<Tid, (Usage, u32)>,
    /// When the last tick was.
    last: Option<Duration>,
    /// While released: until when.
    released_until: Option<Duration>,
}

impl Guard {
    /// A tick at `now` with what each watched thread has used so far.
    pub fn tick(&mut self, now: Duration, readings: &[(Tid, Usage)]) -> Option<Action> {
        let elapsed = self.last.map(|at| now.saturating_sub(at));
        self.last = Some(now);
        if let Some(until) = self.released_until {
            if now < until {
                return None;
            }
            self.released_until = None;
            // Fresh counts: what the threads did at normal priority says nothing.
            self.threads.clear();
            self.record(readings, None);
            return Some(Action::Restore);
        }
        if self.record(readings, elapsed) {
            self.released_until = Some(now + COOLDOWN);
            self.threads.clear();
            return Some(Action::Release);
        }
        None
    }

    /// Records the readings; whether a thread has run through [`SATURATED_TICKS`] ticks in a
    /// row without sleeping. Threads not read any more are forgotten.
    fn record(&mut self, readings: &[(Tid, Usage)], elapsed: Option<Duration>) -> bool {
        let mut overloaded = false;
        let mut next = HashMap::with_capacity(readings.len());
        for &(tid, usage) in readings {
            let streak = match (self.threads.get(&tid), elapsed) {
                (Some((before, streak)), Some(elapsed)) if !elapsed.is_zero() => {
                    // Runnable all along: running, or waiting for a CPU (another thread of
                    // the agent's on the same core, on a one-core machine, say).
                    let wanted = usage.ran.saturating_sub(before.ran)
                        + usage.waited.saturating_sub(before.waited);
                    let busy = wanted.as_secs_f64() >= BUSY_SHARE * elapsed.as_secs_f64();
                    if busy && usage.sleeps == before.sleeps {
                        streak + 1
                    } else {
                        0
                    }
                }
                _ => 0,
            };
            overloaded |= streak >= SATURATED_TICKS;
            next.insert(tid, (usage, streak));
        }
        self.threads = next;
        overloaded
    }

    /// Whether the threads are at normal priority now.
    pub fn released(&self) -> bool {
        self.released_until.is_some()
    }
}

/// Where the agent's priority stands, for `status` and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// `MESHLINK_SCHEDULING=normal`.
    Normal,
    /// Real time, as asked.
    Realtime,
    /// Asked, refused by the system (no `CAP_SYS_NICE`, say): normal priority.
    Unavailable,
    /// Given up for a while: the agent was overloaded.
    Released,
}

/// The process's threads and their priority: one per process, since priority is.
pub struct Threads {
    /// The runtime's threads, by id.
    tids: Mutex<Vec<Tid>>,
    /// A `State`, as its index.
    state: AtomicU8,
    /// Times the guard released real time.
    releases: AtomicU64,
}

const STATES: [State; 4] = [
    State::Normal,
    State::Realtime,
    State::Unavailable,
    State::Released,
];

/// The process's.
static THREADS: Threads = Threads {
    tids: Mutex::new(Vec::new()),
    state: AtomicU8::new(0),
    releases: AtomicU64::new(0),
};

/// The process's threads.
pub fn threads() -> &'static Threads {
    &THREADS
}

impl Threads {
    fn set_state(&self, state: State) {
        let i = STATES.iter().position(|s| *s == state).unwrap_or(0);
        self.state.store(i as u8, Ordering::Relaxed);
    }

    /// Where the priority stands.
    pub fn state(&self) -> State {
        STATES[usize::from(self.state.load(Ordering::Relaxed)) % STATES.len()]
    }

    /// Times the guard released real time since start.
    pub fn releases(&self) -> u64 {
        self.releases.load(Ordering::Relaxed)
    }

    /// Asks for `scheduling` before the runtime's threads start.
    pub fn ask(&self, scheduling: Scheduling) {
        self.set_state(match scheduling {
            Scheduling::Realtime => State::Realtime,
            Scheduling::Normal => State::Normal,
        });
    }

    /// A runtime thread starts (tokio's `on_thread_start`): watched, and at real time when
    /// that is asked and held.
    pub fn started(&self, os: &impl Os) {
        let tid = current_tid();
        self.tids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tid);
        if self.state() == State::Realtime {
            if let Err(e) = os.set_priority(tid, Some(PRIORITY)) {
                self.set_state(State::Unavailable);
                tracing::warn!(
                    "cannot take real-time priority ({e}; the agent needs CAP_SYS_NICE): the data \
                     plane runs at normal priority, and packets wait longer under load"
                );
            }
        }
    }

    /// A runtime thread stops (tokio's `on_thread_stop`).
    pub fn stopped(&self) {
        let tid = current_tid();
        self.tids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|t| *t != tid);
    }

    fn tids(&self) -> Vec<Tid> {
        self.tids.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies the guard's decision to every watched thread.
    fn apply(&self, os: &impl Os, action: Action) {
        let priority = match action {
            Action::Release => None,
            Action::Restore => Some(PRIORITY),
        };
        let mut failed = None;
        for tid in self.tids() {
            // A thread that has just exited is no failure.
            if let Err(e) = os.set_priority(tid, priority) {
                if e.raw_os_error() != Some(libc::ESRCH) {
                    failed = Some(e);
                }
            }
        }
        match (action, failed) {
            (Action::Release, _) => {
                self.releases.fetch_add(1, Ordering::Relaxed);
                self.set_state(State::Released);
                tracing::warn!(
                    "the agent is overloaded (a thread ran {:?} without sleeping): it gives up \
                     real-time priority for {COOLDOWN:?} so that the host's other work runs",
                    TICK * SATURATED_TICKS
                );
            }
            (Action::Restore, None) => {
                self.set_state(State::Realtime);
                tracing::info!("the agent takes real-time priority back");
            }
            (Action::Restore, Some(e)) => {
                self.set_state(State::Unavailable);
                tracing::warn!("cannot take real-time priority back ({e}): normal priority");
            }
        }
    }

    /// One look at the threads: their usage to the guard, its decision applied. Returns
    /// whether the guard should go on (false once real time is off for good).
    pub fn check(&self, os: &impl Os, guard: &mut Guard, now: Duration) -> bool {
        if matches!(self.state(), State::Normal | State::Unavailable) {
            return false;
        }
        let readings: Vec<(Tid, Usage)> = self
            .tids()
            .into_iter()
            .filter_map(|t| os.usage(t).ok().map(|u| (t, u)))
            .collect();
        if let Some(action) = guard.tick(now, &readings) {
            self.apply(os, action);
        }
        true
    }
}

/// Starts the guard's thread when real time is held; it ends when real time goes for good.
pub fn spawn_guard() {
    let threads = threads();
    if threads.state() != State::Realtime {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("meshlink-guard".into())
        .spawn(move || {
            let os = Linux;
            // Above the threads it watches; at normal priority it would wait for them.
            let _ = os.set_priority(current_tid(), Some(GUARD_PRIORITY));
            let start = Instant::now();
            let mut guard = Guard::default();
            while threads.check(&os, &mut guard, start.elapsed()) {
                std::thread::sleep(TICK);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the real-time guard ({e}): normal priority");
        threads.apply(&Linux, Action::Release);
        threads.set_state(State::Unavailable);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    fn u(sleeps: u64, ran_ms: u64) -> Usage {
        Usage {
            sleeps,
            ran: ms(ran_ms),
            waited: Duration::ZERO,
        }
    }

    #[test]
    fn the_variable_names_itself_when_wrong() {
        assert_eq!(Scheduling::from_env_value(None), Ok(Scheduling::Realtime));
        assert_eq!(
            Scheduling::from_env_value(Some(" ")),
            Ok(Scheduling::Realtime)
        );
        assert_eq!(
            Scheduling::from_env_value(Some("Normal")),
            Ok(Scheduling::Normal)
        );
        assert_eq!(
            Scheduling::from_env_value(Some("realtime")),
            Ok(Scheduling::Realtime)
        );
        let e = Scheduling::from_env_value(Some("fifo")).unwrap_err();
        assert!(e.starts_with("MESHLINK_SCHEDULING: \"fifo\""), "{e}");
    }

    #[test]
    fn a_loaded_thread_that_sleeps_is_never_released() {
        let mut g = Guard::default();
        // 70 ms of each 100 with hundreds of sleeps: the bench's loaded agent.
        for i in 0..100 {
            assert_eq!(g.tick(ms(i * 100), &[(7, u(i * 300, i * 70))]), None);
        }
        // Running all along but sleeping now and then: still not overloaded.
        for i in 0..100 {
            assert_eq!(
                g.tick(ms(10_000 + i * 100), &[(7, u(30_000 + i, 7_000 + i * 100))]),
                None
            );
        }
        assert!(!g.released());
    }

    #[test]
    fn a_thread_that_runs_without_sleeping_releases_all_for_the_cooldown() {
        let mut g = Guard::default();
        let idle = |i: u64| (8, u(i * 50, i * 5));
        assert_eq!(g.tick(ms(0), &[(7, u(10, 0)), idle(0)]), None);
        assert_eq!(g.tick(ms(100), &[(7, u(10, 100)), idle(1)]), None);
        assert_eq!(g.tick(ms(200), &[(7, u(10, 195)), idle(2)]), None);
        assert_eq!(
            g.tick(ms(300), &[(7, u(10, 295)), idle(3)]),
            Some(Action::Release)
        );
        assert!(g.released());
        // Nothing until the cooldown is over, whatever the threads do.
        let mut t = 400;
        while t < 300 + COOLDOWN.as_millis() as u64 {
            assert_eq!(g.tick(ms(t), &[(7, u(10, t)), idle(t)]), None);
            t += 100;
        }
        assert_eq!(
            g.tick(ms(t), &[(7, u(10, t)), idle(t)]),
            Some(Action::Restore)
        );
        assert!(!g.released());
        // Counted afresh: three more busy ticks before the next release.
        assert_eq!(g.tick(ms(t + 100), &[(7, u(10, t + 100))]), None);
        assert_eq!(g.tick(ms(t + 200), &[(7, u(10, t + 200))]), None);
        assert_eq!(
            g.tick(ms(t + 300), &[(7, u(10, t + 300))]),
            Some(Action::Release)
        );
    }

    #[test]
    fn a_sleep_or_a_short_tick_breaks_the_streak() {
        let mut g = Guard::default();
        g.tick(ms(0), &[(7, u(0, 0))]);
        g.tick(ms(100), &[(7, u(0, 100))]);
        g.tick(ms(200), &[(7, u(0, 200))]);
        // One sleep: the streak starts over.
        assert_eq!(g.tick(ms(300), &[(7, u(1, 300))]), None);
        g.tick(ms(400), &[(7, u(1, 400))]);
        // Descheduled for a while (ran 50 of 100 ms): not running all along.
        assert_eq!(g.tick(ms(500), &[(7, u(1, 450))]), None);
        g.tick(ms(600), &[(7, u(1, 550))]);
        g.tick(ms(700), &[(7, u(1, 650))]);
        assert_eq!(g.tick(ms(800), &[(7, u(1, 750))]), Some(Action::Release));
    }

    #[test]
    fn threads_that_share_a_core_without_sleeping_are_overloaded_too() {
        let mut g = Guard::default();
        // Two threads on one core, each running half the time and waiting the other half.
        let both = |t: u64| {
            let half = Usage {
                sleeps: 3,
                ran: ms(t / 2),
                waited: ms(t / 2),
            };
            [(7, half), (8, half)]
        };
        assert_eq!(g.tick(ms(0), &both(0)), None);
        assert_eq!(g.tick(ms(100), &both(100)), None);
        assert_eq!(g.tick(ms(200), &both(200)), None);
        assert_eq!(g.tick(ms(300), &both(300)), Some(Action::Release));
    }

    #[test]
    fn a_thread_seen_for_the_first_time_starts_with_no_streak() {
        let mut g = Guard::default();
        g.tick(ms(0), &[(7, u(0, 0))]);
        g.tick(ms(100), &[(7, u(1, 50))]);
        // Thread 9 appears having run a lot: that is its past, not this tick.
        assert_eq!(g.tick(ms(200), &[(7, u(2, 60)), (9, u(0, 10_000))]), None);
        assert_eq!(g.tick(ms(300), &[(7, u(3, 70)), (9, u(0, 10_100))]), None);
        assert_eq!(g.tick(ms(400), &[(7, u(4, 80)), (9, u(0, 10_200))]), None);
        assert_eq!(
            g.tick(ms(500), &[(7, u(5, 90)), (9, u(0, 10_300))]),
            Some(Action::Release)
        );
    }

    /// An `Os` that records what was asked of it.
    #[derive(Default)]
    struct Fake {
        set: Mutex<Vec<(Tid, Option<i32>)>>,
        refuse: bool,
        usage: Mutex<HashMap<Tid, Usage>>,
    }

    impl Os for Fake {
        fn set_priority(&self, tid: Tid, priority: Option<i32>) -> io::Result<()> {
            if self.refuse && priority.is_some() {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            self.set.lock().unwrap().push((tid, priority));
            Ok(())
        }

        fn usage(&self, tid: Tid) -> io::Result<Usage> {
            self.usage
                .lock()
                .unwrap()
                .get(&tid)
                .copied()
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
        }
    }

    fn fresh() -> Threads {
        Threads {
            tids: Mutex::new(Vec::new()),
            state: AtomicU8::new(0),
            releases: AtomicU64::new(0),
        }
    }

    #[test]
    fn threads_take_real_time_at_start_and_the_guard_releases_and_restores_them_all() {
        let threads = fresh();
        let os = Fake::default();
        threads.ask(Scheduling::Realtime);
        threads.started(&os);
        let me = current_tid();
        assert_eq!(*os.set.lock().unwrap(), vec![(me, Some(PRIORITY))]);
        assert_eq!(threads.state(), State::Realtime);
        let mut guard = Guard::default();
        for i in 0..4u64 {
            os.usage.lock().unwrap().insert(me, u(5, i * 100));
            assert!(threads.check(&os, &mut guard, ms(i * 100)));
        }
        assert_eq!(threads.state(), State::Released);
        assert_eq!(threads.releases(), 1);
        assert_eq!(os.set.lock().unwrap().last(), Some(&(me, None)));
        assert!(threads.check(&os, &mut guard, ms(300) + COOLDOWN));
        assert_eq!(threads.state(), State::Realtime);
        assert_eq!(os.set.lock().unwrap().last(), Some(&(me, Some(PRIORITY))));
        threads.stopped();
        assert!(threads.tids().is_empty());
    }

    #[test]
    fn a_refusal_leaves_normal_priority_and_no_guard() {
        let threads = fresh();
        let os = Fake {
            refuse: true,
            ..Fake::default()
        };
        threads.ask(Scheduling::Realtime);
        threads.started(&os);
        assert_eq!(threads.state(), State::Unavailable);
        assert!(!threads.check(&os, &mut Guard::default(), ms(0)));
        // Normal asked: nothing is set at all.
        let threads = fresh();
        let os = Fake::default();
        threads.ask(Scheduling::Normal);
        threads.started(&os);
        assert!(os.set.lock().unwrap().is_empty());
        assert!(!threads.check(&os, &mut Guard::default(), ms(0)));
    }

    /// The policy of thread `tid` of this process (`/proc/self/task/TID/stat`, field 41).
    fn policy_of(tid: Tid) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let rest = stat.rsplit_once(") ").unwrap().1;
        rest.split_whitespace()
            .nth(41 - 3)
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_real_thread_spinning_at_real_time_is_released_and_restored() {
        if !nix::unistd::geteuid().is_root() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "needs root under CI"
            );
            eprintln!("skipped: real-time priority needs root");
            return;
        }
        let threads = fresh();
        threads.ask(Scheduling::Realtime);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let spinner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                tx.send(current_tid()).unwrap();
                // Never sleeps: a loop that cannot keep up.
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let tid = rx.recv().unwrap();
        threads.tids.lock().unwrap().push(tid);
        Linux.set_priority(tid, Some(PRIORITY)).unwrap();
        assert_eq!(policy_of(tid), libc::SCHED_RR);
        // The checks run as the guard's thread does, above the spinner.
        let me = current_tid();
        Linux.set_priority(me, Some(GUARD_PRIORITY)).unwrap();
        let start = Instant::now();
        let mut guard = Guard::default();
        let mut released_at = None;
        let mut restored_at = None;
        while start.elapsed() < COOLDOWN + Duration::from_secs(2) && restored_at.is_none() {
            threads.check(&Linux, &mut guard, start.elapsed());
            match threads.state() {
                State::Released if released_at.is_none() => {
                    released_at = Some(start.elapsed());
                    assert_eq!(policy_of(tid), libc::SCHED_OTHER);
                }
                State::Realtime if released_at.is_some() => restored_at = Some(start.elapsed()),
                _ => {}
            }
            std::thread::sleep(TICK);
        }
        let policy_after = policy_of(tid);
        stop.store(true, Ordering::Relaxed);
        spinner.join().unwrap();
        Linux.set_priority(me, None).unwrap();
        let released_at = released_at.expect("the spinning thread was never released");
        // Three busy ticks after the first reading, a tick or two of slack.
        assert!(
            released_at <= TICK * (SATURATED_TICKS + 3),
            "{released_at:?}"
        );
        let restored_at = restored_at.expect("real time was never restored");
        assert!(
            restored_at >= released_at + COOLDOWN,
            "{released_at:?} {restored_at:?}"
        );
        assert_eq!(policy_after, libc::SCHED_RR);
        assert_eq!(threads.releases(), 1);
    }

    #[test]
    fn the_real_system_reads_this_thread() {
        let a = Linux.usage(current_tid()).unwrap();
        std::thread::sleep(ms(2));
        let b = Linux.usage(current_tid()).unwrap();
        assert!(b.sleeps > a.sleeps, "{a:?} {b:?}");
        assert!(Linux.usage(-5).is_err());
    }
}
