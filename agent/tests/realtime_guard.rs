//! The real-time guard on the real system: a thread spinning at `SCHED_RR` 1, as an agent's
//! loop would under a flood, is released to normal priority within a few checks and gets real
//! time back after the cooldown. Its own test binary, so that the spinning thread competes with
//! no other test. Needs the right to real time (root); under `CI=true` its absence fails.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use meshlink_agent::platform::sched::{
    current_tid, Guard, Linux, Os, Scheduling, State, Threads, Tid, COOLDOWN, GUARD_PRIORITY,
    SATURATED_TICKS, TICK,
};

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

/// Stops the spinner and puts this thread back at normal priority, however the test ends.
struct Cleanup(Arc<AtomicBool>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        let _ = Linux.set_priority(current_tid(), None);
    }
}

#[test]
fn a_thread_spinning_at_real_time_is_released_and_restored() {
    static THREADS: Threads = Threads::new();
    THREADS.ask(Scheduling::Realtime);
    let stop = Arc::new(AtomicBool::new(false));
    let cleanup = Cleanup(stop.clone());
    let (tx, rx) = mpsc::channel();
    let spinner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // As a runtime thread starts: registered, and at real time if it may.
            THREADS.started(&Linux);
            tx.send(current_tid()).unwrap();
            // Never sleeps: a loop that cannot keep up.
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
            THREADS.stopped();
        })
    };
    let tid = rx.recv().unwrap();
    if THREADS.state() == State::Unavailable {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "real-time priority refused: this test needs root under CI"
        );
        eprintln!("skipped: no right to real-time priority here");
        return;
    }
    assert_eq!(policy_of(tid), libc::SCHED_RR);
    // The checks run as the guard's thread does, above the spinner.
    Linux
        .set_priority(current_tid(), Some(GUARD_PRIORITY))
        .unwrap();
    let start = Instant::now();
    let mut guard = Guard::default();
    let (mut released_at, mut restored_at) = (None, None);
    while start.elapsed() < COOLDOWN + Duration::from_secs(3) && restored_at.is_none() {
        assert!(THREADS.check(&Linux, &mut guard, start.elapsed()));
        match THREADS.state() {
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
    drop(cleanup);
    spinner.join().unwrap();
    let released_at = released_at.expect("the spinning thread was never released");
    // Three busy ticks after the first reading, and a tick or two of slack.
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
    assert_eq!(THREADS.releases(), 1);
    assert!(THREADS.tids().is_empty());
}
