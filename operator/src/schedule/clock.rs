//! The schedules' clock: the system's, or, for tests only, the time written in the file named
//! by `SENDENSE_TEST_CLOCK_FILE` (RFC 3339, e.g. `2027-01-25T01:00:05Z`), so a test can walk a
//! schedule through days and months in minutes. Only the schedule controller reads it: when
//! runs are due, and the time a run's restore points are filed under for retention. Every
//! other time the operator keeps (deadlines, leases, status) is the system's.

use std::path::PathBuf;
use std::time::Duration;

use jiff::Timestamp;

#[derive(Debug, Clone, Default)]
pub struct Clock {
    file: Option<PathBuf>,
}

impl Clock {
    /// The system's clock.
    pub fn system() -> Self {
        Self { file: None }
    }

    /// The test clock when `SENDENSE_TEST_CLOCK_FILE` is set, else the system's.
    pub fn from_env() -> Self {
        match std::env::var_os("SENDENSE_TEST_CLOCK_FILE") {
            Some(f) if !f.is_empty() => {
                tracing::warn!(
                    file = %PathBuf::from(&f).display(),
                    "SENDENSE_TEST_CLOCK_FILE is set: schedules run on the time read from this file (for tests only)"
                );
                Self {
                    file: Some(f.into()),
                }
            }
            _ => Self::system(),
        }
    }

    /// Now. A test clock whose file cannot be read or parsed stops the schedules (an error)
    /// rather than falling back to the system's time, which would run them at the wrong time.
    pub fn now(&self) -> Result<Timestamp, String> {
        let Some(file) = &self.file else {
            return Ok(Timestamp::now());
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("test clock {}: {e}", file.display()))?;
        text.trim().parse().map_err(|e| {
            format!(
                "test clock {}: {:?} is not an RFC 3339 time ({e})",
                file.display(),
                text.trim()
            )
        })
    }

    /// How long a schedule may sleep at most: a test clock is moved by hand, so it is read
    /// again every second.
    pub fn longest_sleep(&self) -> Option<Duration> {
        self.file.as_ref().map(|_| Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_clock_reads_its_file_and_refuses_garbage() {
        let dir = std::env::temp_dir().join(format!("sendense-clock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("now");
        let clock = Clock {
            file: Some(file.clone()),
        };
        assert!(clock.now().unwrap_err().contains("test clock"));
        std::fs::write(&file, "2027-01-25T01:00:05Z\n").unwrap();
        assert_eq!(clock.now().unwrap().to_string(), "2027-01-25T01:00:05Z");
        assert_eq!(clock.longest_sleep(), Some(Duration::from_secs(1)));
        std::fs::write(&file, "tomorrow").unwrap();
        assert!(clock.now().unwrap_err().contains("not an RFC 3339 time"));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(Clock::system().now().is_ok());
        assert_eq!(Clock::system().longest_sleep(), None);
    }
}
