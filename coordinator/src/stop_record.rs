//! The stop leases a lone coordinator grants as it stops, recorded in its state directory
//! (`stop-lease`) before the first is granted, so that the next run on the same store waits
//! out what was really granted: one started with a shorter `workload_lease_ms` would
//! otherwise count a shorter stop lease than its predecessor gave.
//!
//! The file holds two lines, `until_unix_ms=` (the latest instant a stop lease may run to,
//! by the wall clock) and `longest_ms=` (how long from the recording that was); what is left
//! is never taken as longer than `longest_ms`, so a wall clock stepped back cannot stretch it.
//! A run writes it as it starts too, with a third line, `running_lease_ms=` (its lease, which
//! a crash leaves running for that long whenever the next run starts); the first two then say
//! what was left of its predecessor's stop leases.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The record's file name in the state directory.
pub const FILE: &str = "stop-lease";

/// A record that cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a record.
    #[error("{path}: {field}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The line's key.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Records, at `now`, that stop leases granted from now on run for at most `longest`.
/// Written to a temporary file, synced, then renamed over the record.
///
/// # Errors
/// [`RecordError::Io`].
pub fn record(dir: &Path, now: SystemTime, longest: Duration) -> Result<(), RecordError> {
    let until = unix_ms(now).saturating_add(millis(longest));
    write(
        dir,
        &format!("until_unix_ms={until}\nlongest_ms={}\n", millis(longest)),
    )
}

/// Records, at `now` as a run starts (before it grants any lease), that the leases it grants
/// run for at most `lease` for as long as it runs, and that `inherited` is left of its
/// predecessor's stop leases: a crash leaves its next run (started with a shorter lease,
/// perhaps) waiting out the longer of the two, as [`left`] reads it. An orderly stop
/// replaces it ([`record`]).
///
/// # Errors
/// [`RecordError::Io`].
pub fn record_running(
    dir: &Path,
    now: SystemTime,
    lease: Duration,
    inherited: Duration,
) -> Result<(), RecordError> {
    let until = unix_ms(now).saturating_add(millis(inherited));
    write(
        dir,
        &format!(
            "until_unix_ms={until}\nlongest_ms={}\n{RUNNING}={}\n",
            millis(inherited),
            millis(lease)
        ),
    )
}

/// The line of a running record ([`record_running`]): the running lease.
const RUNNING: &str = "running_lease_ms";

fn write(dir: &Path, text: &str) -> Result<(), RecordError> {
    let path = dir.join(FILE);
    let io = |source| RecordError::Io {
        path: path.clone(),
        source,
    };
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(())
}

/// What is left at `now` of the stop leases recorded in `dir`: zero without a record or once
/// they are over, never more than the record's `longest_ms`.
///
/// # Errors
/// [`RecordError`]: the file cannot be read, or a line is missing or not a number.
pub fn left(dir: &Path, now: SystemTime) -> Result<Duration, RecordError> {
    Ok(read(dir, now)?.0)
}

/// [`left`], and the record's `longest_ms` while something is left (zero otherwise): how long
/// before the end a stop lease, or a change of holder made while stopping, may have begun.
///
/// # Errors
/// As [`left`].
pub fn read(dir: &Path, now: SystemTime) -> Result<(Duration, Duration), RecordError> {
    let path = dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Duration::ZERO, Duration::ZERO))
        }
        Err(source) => return Err(RecordError::Io { path, source }),
    };
    let field = |key: &'static str| -> Result<Option<u64>, RecordError> {
        let Some(value) = text
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        else {
            return Ok(None);
        };
        value
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| RecordError::Malformed {
                path: path.clone(),
                field: key,
                reason: format!("{value:?}: {e}"),
            })
    };
    let needed = |key: &'static str| -> Result<u64, RecordError> {
        field(key)?.ok_or_else(|| RecordError::Malformed {
            path: path.clone(),
            field: key,
            reason: "missing".into(),
        })
    };
    let until = needed("until_unix_ms")?;
    let longest = needed("longest_ms")?;
    // A running record (the run crashed): its lease, whenever the next run starts.
    let running = field(RUNNING)?.unwrap_or(0);
    let stopping = until.saturating_sub(unix_ms(now)).min(longest);
    let left = stopping.max(running);
    let longest = if stopping > 0 {
        longest.max(running)
    } else {
        running
    };
    Ok((Duration::from_millis(left), Duration::from_millis(longest)))
}

fn unix_ms(t: SystemTime) -> u64 {
    millis(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_left_of_a_recorded_stop_lease() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ms = Duration::from_millis;
        assert_eq!(left(dir.path(), t0).unwrap(), Duration::ZERO, "no record");
        record(dir.path(), t0, ms(4_450)).unwrap();
        assert_eq!(left(dir.path(), t0 + ms(1_000)).unwrap(), ms(3_450));
        assert_eq!(left(dir.path(), t0 + ms(9_000)).unwrap(), Duration::ZERO);
        // A wall clock stepped back an hour: never more than was granted.
        assert_eq!(
            left(dir.path(), t0 - Duration::from_secs(3600)).unwrap(),
            ms(4_450)
        );
        // A newer stop replaces the record.
        record(dir.path(), t0 + ms(60_000), ms(11_000)).unwrap();
        assert_eq!(left(dir.path(), t0 + ms(61_000)).unwrap(), ms(10_000));
    }

    #[test]
    fn a_running_record_and_the_longest_while_something_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ms = Duration::from_millis;
        assert_eq!(read(dir.path(), t0).unwrap(), (ms(0), ms(0)), "no record");
        record(dir.path(), t0, ms(4_450)).unwrap();
        assert_eq!(
            read(dir.path(), t0 + ms(1_000)).unwrap(),
            (ms(3_450), ms(4_450))
        );
        assert_eq!(read(dir.path(), t0 + ms(9_000)).unwrap(), (ms(0), ms(0)));
        // A run records its lease as it starts: after its crash, whenever the next run starts,
        // that long is left.
        record_running(dir.path(), t0, ms(3_000), ms(0)).unwrap();
        for later in [ms(0), Duration::from_secs(86_400)] {
            assert_eq!(
                read(dir.path(), t0 + later).unwrap(),
                (ms(3_000), ms(3_000))
            );
        }
        // With its predecessor's stop lease still running at its start: the longer of the two,
        // the stop lease only until it ends.
        record_running(dir.path(), t0, ms(1_500), ms(4_000)).unwrap();
        assert_eq!(
            read(dir.path(), t0 + ms(1_000)).unwrap(),
            (ms(3_000), ms(4_000))
        );
        assert_eq!(
            read(dir.path(), t0 + ms(3_000)).unwrap(),
            (ms(1_500), ms(4_000))
        );
        assert_eq!(
            read(dir.path(), t0 + ms(60_000)).unwrap(),
            (ms(1_500), ms(1_500))
        );
        std::fs::write(
            dir.path().join(FILE),
            "until_unix_ms=1\nlongest_ms=0\nrunning_lease_ms=x\n",
        )
        .unwrap();
        let e = read(dir.path(), t0).unwrap_err().to_string();
        assert!(e.contains("stop-lease: running_lease_ms: \"x\""), "{e}");
        // Its orderly stop replaces it.
        record(dir.path(), t0, ms(4_450)).unwrap();
        assert_eq!(left(dir.path(), t0 + ms(4_000)).unwrap(), ms(450));
    }

    #[test]
    fn a_malformed_record_names_its_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        std::fs::write(dir.path().join(FILE), "until_unix_ms=12\n").unwrap();
        let e = left(dir.path(), now).unwrap_err().to_string();
        assert!(e.ends_with("stop-lease: longest_ms: missing"), "{e}");
        std::fs::write(dir.path().join(FILE), "until_unix_ms=soon\nlongest_ms=5\n").unwrap();
        let e = left(dir.path(), now).unwrap_err().to_string();
        assert!(e.contains("stop-lease: until_unix_ms: \"soon\""), "{e}");
    }
}
