//! Real-time priority for the agent's threads, given up while the agent is overloaded.
//!
//! Under a bulk transfer the host's CPUs are busy (the application, its TCP stack, the agent's
//! own loops), and a ping or an interactive packet waits for the agent's thread that should
//! carry it to be scheduled: measured on the 2-core bench, the reply's path through the idle
//! send loop took 1.2 ms on average, and the whole round trip 3.4 ms, almost none of it in a
//! queue. The agent's runtime threads take the lowest real-time priority (`SCHED_RR` 1), so
//! that they run as soon as a packet arrives: the same ping then took 0.5 ms at a higher
//! throughput (BENCHMARKS.md).
//!
//! Real time must not cost the host its other work. When a thread of the agent has been
//! runnable (running, or waiting for a CPU) for at least [`BUSY_SHARE`] of each of
//! [`SATURATED_TICKS`] checks in a row, the agent wants more than a core: a flood, or more
//! traffic than it can encrypt. Then every runtime thread drops to normal priority, sharing the
//! CPUs fairly, for a cooldown that starts at [`COOLDOWN`] and doubles while the overload goes
//! on (up to [`MAX_COOLDOWN`]), and takes real time back after. A loaded agent with spare
//! capacity (the bench's: 20-70 ms of every 100) is not released. The kernel's own limit on
//! real-time threads (`kernel.sched_rt_runtime_us`, 95 %) stays below that.
//!
//! `MESHLINK_SCHEDULING=normal` keeps the agent at normal priority. Without the right to real
//! time (`CAP_SYS_NICE`, or an `RLIMIT_RTPRIO` of at least 2) the agent says so once and runs
//! at normal priority; so it does, with every thread put back, whenever the guard cannot do its
//! work (no scheduler statistics in `/proc`, say).
//!
//! The project's unsafe code lives here: `sched_setscheduler(2)`, which neither the standard
//! library nor nix wraps.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The real-time priority of the agent's threads: the lowest, below any real-time thread an
/// administrator runs.
pub const PRIORITY: i32 = 1;
/// The guard's own priority: above the threads it watches, so that it runs when they do not
/// sleep. The highest the agent asks for (`LimitRTPRIO=2` allows both).
pub const GUARD_PRIORITY: i32 = 2;
/// How often the guard looks at the threads.
pub const TICK: Duration = Duration::from_millis(100);
/// Checks in a row a thread must be runnable through to count as overloaded.
pub const SATURATED_TICKS: u32 = 3;
/// A tick in which a thread ran or waited for a CPU at least this share of the time counts as
/// runnable all along.
pub const BUSY_SHARE: f64 = 0.9;
/// How long the agent stays at normal priority after a first release.
pub const COOLDOWN: Duration = Duration::from_secs(2);
/// The longest cooldown: each release that follows the last within [`QUIET`] doubles it.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(60);
/// Real time held this long without a release ends an overload: the next cooldown is
/// [`COOLDOWN`] again.
pub const QUIET: Duration = Duration::from_secs(30);

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

/// What the guard reads of a thread (`/proc/self/task/TID/schedstat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
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
    /// The system's: `EPERM` without the right to real time, `ESRCH` for a thread gone.
    fn set_priority(&self, tid: Tid, priority: Option<i32>) -> io::Result<()>;
    /// What thread `tid` of this process has used.
    ///
    /// # Errors
    /// The system's (the thread has exited, the kernel keeps no statistics).
    fn usage(&self, tid: Tid) -> io::Result<Usage>;
}

/// The real system.
#[derive(Debug, Clone, Copy, Default)]
pub struct Linux;

impl Os for Linux {
    fn set_priority(&self, tid: Tid, priority: Option<i32>) -> io::Result<()> {
        // A process the agent starts keeps none of this (SCHED_RESET_ON_FORK; so does a thread,
        // which `Threads::started` puts at real time itself).
        let (policy, priority) = match priority {
            Some(p) => (libc::SCHED_RR | libc::SCHED_RESET_ON_FORK, p),
            None => (libc::SCHED_OTHER | libc::SCHED_RESET_ON_FORK, 0),
        };
        let param = libc::sched_param {
            sched_priority: priority,
        };
        // SAFETY: `param` is a valid, initialized `sched_param` that outlives the call, and
        // the kernel only reads it; an invalid `tid` or policy is an error return, not UB. A
        // `tid` acts on that thread alone; `Threads` calls this only for threads that have not
        // stopped (they leave the registry under its lock before they exit), so no id reused by
        // another process is ever named.
        let r = unsafe { libc::sched_setscheduler(tid, policy, &param) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn usage(&self, tid: Tid) -> io::Result<Usage> {
        // Nanoseconds run, nanoseconds waited on a run queue, time slices.
        let schedstat = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))?;
        let mut fields = schedstat
            .split_whitespace()
            .map(|v| v.parse().map(Duration::from_nanos));
        let (Some(Ok(ran)), Some(Ok(waited))) = (fields.next(), fields.next()) else {
            return Err(io::Error::other(format!(
                "/proc/self/task/{tid}/schedstat: no run and wait times in {schedstat:?}"
            )));
        };
        Ok(Usage { ran, waited })
    }
}

/// The calling thread's id.
pub fn current_tid() -> Tid {
    nix::unistd::gettid().as_raw()
}

/// What the guard decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A thread is overloaded: every thread to normal priority for this long.
    Release(Duration),
    /// The cooldown is over: every thread back to real time.
    Restore,
}

/// The guard's state: a pure state machine, given the time and what the threads used.
#[derive(Debug)]
pub struct Guard {
    /// Per thread: its last reading, and the ticks in a row it was runnable through.
    threads: HashMap<Tid, (Usage, u32)>,
    /// When the last tick was.
    last: Option<Duration>,
    /// While released: until when.
    released_until: Option<Duration>,
    /// The next release's cooldown.
    cooldown: Duration,
    /// When real time was last restored, while no release has followed.
    restored_at: Option<Duration>,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            threads: HashMap::new(),
            last: None,
            released_until: None,
            cooldown: COOLDOWN,
            restored_at: None,
        }
    }
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
            self.restored_at = Some(now);
            // Fresh counts: what the threads did at normal priority says nothing.
            self.threads.clear();
            self.record(readings, None);
            return Some(Action::Restore);
        }
        if self
            .restored_at
            .is_some_and(|at| now.saturating_sub(at) >= QUIET)
        {
            // The overload is over: the next one starts with the shortest cooldown.
            self.restored_at = None;
            self.cooldown = COOLDOWN;
        }
        if self.record(readings, elapsed) {
            let cooldown = self.cooldown;
            self.released_until = Some(now + cooldown);
            self.cooldown = (cooldown * 2).min(MAX_COOLDOWN);
            self.threads.clear();
            return Some(Action::Release(cooldown));
        }
        None
    }

    /// Records the readings; whether a thread has been runnable through [`SATURATED_TICKS`]
    /// ticks in a row. Threads not read any more are forgotten.
    fn record(&mut self, readings: &[(Tid, Usage)], elapsed: Option<Duration>) -> bool {
        let mut overloaded = false;
        let mut next = HashMap::with_capacity(readings.len());
        for &(tid, usage) in readings {
            let streak = match (self.threads.get(&tid), elapsed) {
                (Some((before, streak)), Some(elapsed)) if !elapsed.is_zero() => {
                    // Runnable: running, or waiting for a CPU (another thread of the agent's
                    // on the same core, on a one-core machine, say).
                    let wanted = usage.ran.saturating_sub(before.ran)
                        + usage.waited.saturating_sub(before.waited);
                    if wanted.as_secs_f64() >= BUSY_SHARE * elapsed.as_secs_f64() {
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
    /// Asked, but not to be had (no right to it, no statistics to guard it by): normal
    /// priority.
    Unavailable,
    /// Given up for a while: the agent was overloaded.
    Released,
}

const STATES: [State; 4] = [
    State::Normal,
    State::Realtime,
    State::Unavailable,
    State::Released,
];

/// The process's runtime threads and their priority: one per process, since priority is.
#[derive(Debug)]
pub struct Threads {
    /// The runtime's threads, by id. Its lock also orders every change of priority and of
    /// `state`, so that a thread starting meanwhile sees the state its priority must follow.
    tids: Mutex<Vec<Tid>>,
    /// A `State`, as its index.
    state: AtomicU8,
    /// Times the guard released real time.
    releases: AtomicU64,
}

/// The process's.
static THREADS: Threads = Threads::new();

/// The process's threads.
pub fn threads() -> &'static Threads {
    &THREADS
}

impl Default for Threads {
    fn default() -> Self {
        Threads::new()
    }
}

impl Threads {
    /// No thread, normal priority asked.
    pub const fn new() -> Threads {
        Threads {
            tids: Mutex::new(Vec::new()),
            state: AtomicU8::new(0),
            releases: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Tid>> {
        self.tids.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, state: State) -> State {
        let i = STATES.iter().position(|s| *s == state).unwrap_or(0);
        STATES[usize::from(self.state.swap(i as u8, Ordering::Relaxed)) % STATES.len()]
    }

    /// Where the priority stands.
    pub fn state(&self) -> State {
        STATES[usize::from(self.state.load(Ordering::Relaxed)) % STATES.len()]
    }

    /// Times the guard released real time since start.
    pub fn releases(&self) -> u64 {
        self.releases.load(Ordering::Relaxed)
    }

    /// The threads watched now.
    pub fn tids(&self) -> Vec<Tid> {
        self.lock().clone()
    }

    /// Asks for `scheduling` before the runtime's threads start.
    pub fn ask(&self, scheduling: Scheduling) {
        let _held = self.lock();
        self.set_state(match scheduling {
            Scheduling::Realtime => State::Realtime,
            Scheduling::Normal => State::Normal,
        });
    }

    /// A runtime thread starts (tokio's `on_thread_start`): watched, and at real time when
    /// that is asked and held.
    pub fn started(&self, os: &impl Os) {
        let tid = current_tid();
        let mut tids = self.lock();
        tids.push(tid);
        if self.state() == State::Realtime {
            if let Err(e) = os.set_priority(tid, Some(PRIORITY)) {
                self.give_up_locked(&tids, os, &format!("cannot take real-time priority: {e}"));
            }
        }
    }

    /// A runtime thread stops (tokio's `on_thread_stop`), before it exits.
    pub fn stopped(&self) {
        let tid = current_tid();
        self.lock().retain(|t| *t != tid);
    }

    /// Puts every thread back at normal priority for good, saying why once.
    pub fn give_up(&self, os: &impl Os, why: &str) {
        let tids = self.lock();
        self.give_up_locked(&tids, os, why);
    }

    fn give_up_locked(&self, tids: &[Tid], os: &impl Os, why: &str) {
        for &tid in tids {
            let _ = os.set_priority(tid, None);
        }
        if matches!(
            self.set_state(State::Unavailable),
            State::Realtime | State::Released
        ) {
            tracing::warn!(
                "{why}: the agent runs at normal priority, and packets wait longer under load \
                 (real time needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least \
                 {GUARD_PRIORITY}; MESHLINK_SCHEDULING=normal says this is meant)"
            );
        }
    }

    /// Applies the guard's decision to every watched thread.
    fn apply(&self, os: &impl Os, action: Action) {
        let tids = self.lock();
        match action {
            Action::Release(cooldown) => {
                for &tid in tids.iter() {
                    let _ = os.set_priority(tid, None);
                }
                self.releases.fetch_add(1, Ordering::Relaxed);
                self.set_state(State::Released);
                tracing::warn!(
                    "the agent is overloaded (a thread was runnable for {:?} in a row): it gives \
                     up real-time priority for {cooldown:?} so that the host's other work runs",
                    TICK * SATURATED_TICKS
                );
            }
            Action::Restore => {
                for &tid in tids.iter() {
                    if let Err(e) = os.set_priority(tid, Some(PRIORITY)) {
                        let why = format!("cannot take real-time priority back: {e}");
                        self.give_up_locked(&tids, os, &why);
                        return;
                    }
                }
                self.set_state(State::Realtime);
                tracing::info!("the agent takes real-time priority back");
            }
        }
    }

    /// One look at the threads: their usage to the guard, its decision applied. Returns
    /// whether the guard should go on (false once real time is off for good).
    pub fn check(&self, os: &impl Os, guard: &mut Guard, now: Duration) -> bool {
        if matches!(self.state(), State::Normal | State::Unavailable) {
            return false;
        }
        let tids = self.tids();
        let mut readings = Vec::with_capacity(tids.len());
        let mut failure = None;
        for tid in tids {
            match os.usage(tid) {
                Ok(u) => readings.push((tid, u)),
                Err(e) => failure = Some(e),
            }
        }
        if let (true, Some(e)) = (readings.is_empty(), failure) {
            // Not one thread could be read: the guard is blind.
            self.give_up(
                os,
                &format!("the real-time guard cannot read the threads ({e})"),
            );
            return false;
        }
        if let Some(action) = guard.tick(now, &readings) {
            self.apply(os, action);
        }
        true
    }
}

/// Whether the kernel counts this thread's run time: the guard's own reading before and while
/// it works, for up to [`STATISTICS_PROBE`] (a running thread's figure moves at the
/// scheduler's tick, every 1-10 ms).
fn statistics_count(os: &impl Os) -> io::Result<()> {
    let me = current_tid();
    let before = os.usage(me)?;
    let start = Instant::now();
    while start.elapsed() < STATISTICS_PROBE {
        if os.usage(me)?.ran > before.ran {
            return Ok(());
        }
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_millis(1) {
            std::hint::spin_loop();
        }
    }
    Err(io::Error::other(format!(
        "/proc/self/task/{me}/schedstat did not count {STATISTICS_PROBE:?} of run time"
    )))
}

/// How long the guard works at most to see its run time counted.
const STATISTICS_PROBE: Duration = Duration::from_millis(100);

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
            if let Err(e) = os.set_priority(current_tid(), Some(GUARD_PRIORITY)) {
                threads.give_up(
                    &os,
                    &format!("the real-time guard cannot take its priority ({e})"),
                );
                return;
            }
            if let Err(e) = statistics_count(&os) {
                threads.give_up(
                    &os,
                    &format!("the real-time guard has nothing to go by ({e})"),
                );
                return;
            }
            let start = Instant::now();
            let mut guard = Guard::default();
            while threads.check(&os, &mut guard, start.elapsed()) {
                std::thread::sleep(TICK);
            }
        });
    if let Err(e) = spawned {
        threads.give_up(&Linux, &format!("cannot start the real-time guard ({e})"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    /// A thread that has run `ran_ms` and waited `waited_ms` in all.
    fn u(ran_ms: u64, waited_ms: u64) -> Usage {
        Usage {
            ran: ms(ran_ms),
            waited: ms(waited_ms),
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
    fn a_loaded_thread_with_spare_capacity_is_never_released() {
        let mut g = Guard::default();
        // 70 ms run and 15 waited of each 100: the bench's loaded agent, and more.
        for i in 0..200 {
            assert_eq!(g.tick(ms(i * 100), &[(7, u(i * 70, i * 15))]), None);
        }
        assert!(!g.released());
    }

    #[test]
    fn a_thread_runnable_all_along_releases_all_for_the_cooldown() {
        let mut g = Guard::default();
        let idle = |t: u64| (8, u(t / 20, 0));
        assert_eq!(g.tick(ms(0), &[(7, u(0, 0)), idle(0)]), None);
        assert_eq!(g.tick(ms(100), &[(7, u(100, 0)), idle(100)]), None);
        // Running 80 and waiting 15 of 100: runnable all along too.
        assert_eq!(g.tick(ms(200), &[(7, u(180, 15)), idle(200)]), None);
        assert_eq!(
            g.tick(ms(300), &[(7, u(275, 15)), idle(300)]),
            Some(Action::Release(COOLDOWN))
        );
        assert!(g.released());
        // Nothing until the cooldown is over, whatever the threads do.
        let mut t = 400;
        while t < 300 + COOLDOWN.as_millis() as u64 {
            assert_eq!(g.tick(ms(t), &[(7, u(t, 0)), idle(t)]), None);
            t += 100;
        }
        assert_eq!(
            g.tick(ms(t), &[(7, u(t, 0)), idle(t)]),
            Some(Action::Restore)
        );
        assert!(!g.released());
        // Counted afresh: three more busy ticks before the next release.
        assert_eq!(g.tick(ms(t + 100), &[(7, u(t + 100, 0))]), None);
        assert_eq!(g.tick(ms(t + 200), &[(7, u(t + 200, 0))]), None);
        assert!(matches!(
            g.tick(ms(t + 300), &[(7, u(t + 300, 0))]),
            Some(Action::Release(_))
        ));
    }

    #[test]
    fn one_slack_tick_breaks_the_streak() {
        let mut g = Guard::default();
        g.tick(ms(0), &[(7, u(0, 0))]);
        g.tick(ms(100), &[(7, u(100, 0))]);
        g.tick(ms(200), &[(7, u(200, 0))]);
        // Runnable 85 of 100 ms: the streak starts over.
        assert_eq!(g.tick(ms(300), &[(7, u(285, 0))]), None);
        g.tick(ms(400), &[(7, u(385, 0))]);
        g.tick(ms(500), &[(7, u(485, 0))]);
        assert!(matches!(
            g.tick(ms(600), &[(7, u(585, 0))]),
            Some(Action::Release(_))
        ));
    }

    #[test]
    fn threads_that_share_a_core_are_overloaded_too() {
        let mut g = Guard::default();
        // Two threads on one core, each running half the time and waiting the other half.
        let both = |t: u64| [(7, u(t / 2, t / 2)), (8, u(t / 2, t / 2))];
        assert_eq!(g.tick(ms(0), &both(0)), None);
        assert_eq!(g.tick(ms(100), &both(100)), None);
        assert_eq!(g.tick(ms(200), &both(200)), None);
        assert!(matches!(
            g.tick(ms(300), &both(300)),
            Some(Action::Release(_))
        ));
    }

    #[test]
    fn an_overload_that_goes_on_doubles_the_cooldown_and_a_quiet_spell_resets_it() {
        let mut g = Guard::default();
        let mut t = 0;
        let mut cooldowns = vec![];
        // Runnable all along, for ten minutes.
        while t < 600_000 {
            if let Some(Action::Release(c)) = g.tick(ms(t), &[(7, u(t, 0))]) {
                cooldowns.push(c.as_secs());
            }
            t += 100;
        }
        assert_eq!(cooldowns[..7], [2, 4, 8, 16, 32, 60, 60], "{cooldowns:?}");
        // Quiet for longer than QUIET after the last restore: the next cooldown is the first.
        let mut restored = false;
        while !restored {
            restored = g.tick(ms(t), &[(7, u(t, 0))]) == Some(Action::Restore);
            t += 100;
        }
        let quiet_until = t + QUIET.as_millis() as u64;
        let mut ran = t;
        while t <= quiet_until {
            assert_eq!(g.tick(ms(t), &[(7, u(ran, 0))]), None);
            ran += 10;
            t += 100;
        }
        let mut next = None;
        while next.is_none() {
            ran += 100;
            next = g.tick(ms(t), &[(7, u(ran, 0))]);
            t += 100;
        }
        assert_eq!(next, Some(Action::Release(COOLDOWN)));
    }

    #[test]
    fn a_thread_seen_for_the_first_time_starts_with_no_streak() {
        let mut g = Guard::default();
        g.tick(ms(0), &[(7, u(0, 0))]);
        g.tick(ms(100), &[(7, u(50, 0))]);
        // Thread 9 appears having run a lot: that is its past, not this tick.
        assert_eq!(g.tick(ms(200), &[(7, u(60, 0)), (9, u(10_000, 0))]), None);
        assert_eq!(g.tick(ms(300), &[(7, u(70, 0)), (9, u(10_100, 0))]), None);
        assert_eq!(g.tick(ms(400), &[(7, u(80, 0)), (9, u(10_200, 0))]), None);
        assert!(matches!(
            g.tick(ms(500), &[(7, u(90, 0)), (9, u(10_300, 0))]),
            Some(Action::Release(_))
        ));
    }

    /// An `Os` that records what was asked of it.
    #[derive(Default)]
    struct Fake {
        set: Mutex<Vec<(Tid, Option<i32>)>>,
        /// Refuse real time to these threads (all when it holds 0).
        refuse: Mutex<Vec<Tid>>,
        usage: Mutex<HashMap<Tid, Usage>>,
    }

    impl Os for Fake {
        fn set_priority(&self, tid: Tid, priority: Option<i32>) -> io::Result<()> {
            let refused = self.refuse.lock().unwrap();
            if priority.is_some() && (refused.contains(&tid) || refused.contains(&0)) {
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
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        }
    }

    impl Fake {
        /// The last priority set for each thread.
        fn last(&self) -> HashMap<Tid, Option<i32>> {
            self.set.lock().unwrap().iter().copied().collect()
        }
    }

    /// Real time asked, `tids` watched (as if started), and a fake system.
    fn watching(tids: &[Tid]) -> (Threads, Fake) {
        let threads = Threads::new();
        threads.ask(Scheduling::Realtime);
        threads.tids.lock().unwrap().extend(tids);
        (threads, Fake::default())
    }

    #[test]
    fn threads_take_real_time_at_start_and_the_guard_releases_and_restores_them_all() {
        let threads = Threads::new();
        let os = Fake::default();
        threads.ask(Scheduling::Realtime);
        threads.started(&os);
        let me = current_tid();
        assert_eq!(*os.set.lock().unwrap(), vec![(me, Some(PRIORITY))]);
        assert_eq!(threads.state(), State::Realtime);
        let mut guard = Guard::default();
        for i in 0..4u64 {
            os.usage.lock().unwrap().insert(me, u(i * 100, 0));
            assert!(threads.check(&os, &mut guard, ms(i * 100)));
        }
        assert_eq!(threads.state(), State::Released);
        assert_eq!(threads.releases(), 1);
        assert_eq!(os.last()[&me], None);
        assert!(threads.check(&os, &mut guard, ms(300) + COOLDOWN));
        assert_eq!(threads.state(), State::Realtime);
        assert_eq!(os.last()[&me], Some(PRIORITY));
        threads.stopped();
        assert!(threads.tids().is_empty());
    }

    #[test]
    fn a_refusal_at_start_puts_every_thread_back_and_stops_the_guard() {
        // Threads 1 and 2 started at real time before this one was refused.
        let (threads, os) = watching(&[1, 2]);
        *os.refuse.lock().unwrap() = vec![current_tid()];
        threads.started(&os);
        assert_eq!(threads.state(), State::Unavailable);
        let last = os.last();
        assert_eq!((last[&1], last[&2]), (None, None), "{last:?}");
        assert!(!threads.check(&os, &mut Guard::default(), ms(0)));
        assert_eq!(threads.releases(), 0);
        // Normal asked: nothing is set at all.
        let threads = Threads::new();
        let os = Fake::default();
        threads.ask(Scheduling::Normal);
        threads.started(&os);
        assert!(os.set.lock().unwrap().is_empty());
        assert!(!threads.check(&os, &mut Guard::default(), ms(0)));
    }

    #[test]
    fn a_refused_restore_leaves_every_thread_at_normal_priority() {
        let (threads, os) = watching(&[1, 2]);
        let mut guard = Guard::default();
        for i in 0..4u64 {
            os.usage
                .lock()
                .unwrap()
                .extend([(1, u(i * 100, 0)), (2, u(0, 0))]);
            threads.check(&os, &mut guard, ms(i * 100));
        }
        assert_eq!(threads.state(), State::Released);
        // Thread 2 may not have real time back; thread 1 got it first.
        *os.refuse.lock().unwrap() = vec![2];
        assert!(threads.check(&os, &mut guard, ms(300) + COOLDOWN));
        assert_eq!(threads.state(), State::Unavailable);
        let last = os.last();
        assert_eq!((last[&1], last[&2]), (None, None), "{last:?}");
        assert!(!threads.check(&os, &mut guard, ms(400) + COOLDOWN));
    }

    #[test]
    fn a_guard_that_cannot_read_any_thread_gives_up() {
        let (threads, os) = watching(&[1, 2]);
        assert!(!threads.check(&os, &mut Guard::default(), ms(0)));
        assert_eq!(threads.state(), State::Unavailable);
        assert_eq!((os.last()[&1], os.last()[&2]), (None, None));
        // One thread gone is no reason: the others are read.
        let (threads, os) = watching(&[1, 2]);
        os.usage.lock().unwrap().insert(1, u(0, 0));
        assert!(threads.check(&os, &mut Guard::default(), ms(0)));
        assert_eq!(threads.state(), State::Realtime);
    }

    #[test]
    fn the_real_system_reads_this_thread_and_counts_its_time() {
        let a = Linux.usage(current_tid()).unwrap();
        statistics_count(&Linux).unwrap();
        let b = Linux.usage(current_tid()).unwrap();
        assert!(b.ran > a.ran, "{a:?} {b:?}");
        assert!(Linux.usage(-5).is_err());
    }
}
