//! Termination messages as the kubelet makes them: every run of a container gets an empty host
//! file bind-mounted read-write at its `terminationMessagePath`; when the process ends, the last
//! 4096 bytes of that file become `state.terminated.message`. With `terminationMessagePolicy:
//! FallbackToLogsOnError`, a non-zero exit and an empty file, the tail of the run's log (80
//! lines, 2048 bytes at most) is the message instead.

use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Container;

use super::process::Mount;

/// Where a container writes its message when its spec does not say (the API's default).
pub const DEFAULT_PATH: &str = "/dev/termination-log";
/// At most this many bytes of the file, the last ones, make the message (the kubelet's
/// `MaxContainerTerminationMessageLength`).
pub const MAX_MESSAGE_BYTES: u64 = 4096;
/// The log fallback keeps at most this many lines (`MaxContainerTerminationMessageLogLines`)...
pub const MAX_LOG_LINES: usize = 80;
/// ...and at most this many bytes of them (`MaxContainerTerminationMessageLogLength`).
pub const MAX_LOG_BYTES: u64 = 2048;

/// One container's termination-message file.
#[derive(Clone, Debug, PartialEq)]
pub struct TerminationLog {
    /// The file on the host, emptied before every run.
    pub host: PathBuf,
    /// Where the container sees it: its `terminationMessagePath`.
    pub target: PathBuf,
    /// `terminationMessagePolicy: FallbackToLogsOnError`.
    pub fallback_to_logs: bool,
}

impl TerminationLog {
    /// The file of container `c`, kept as `<container>.termination-log` in the pod's log
    /// directory `logs` (container names are unique within a pod, init containers included);
    /// Err says why the container's path cannot be honoured.
    pub fn of(c: &Container, logs: &Path) -> Result<Self, String> {
        let target = c
            .termination_message_path
            .as_deref()
            .filter(|p| !p.is_empty())
            .unwrap_or(DEFAULT_PATH);
        if !target.starts_with('/') {
            return Err(format!(
                "container {}: terminationMessagePath {target} is not an absolute path",
                c.name
            ));
        }
        Ok(Self {
            host: logs.join(format!("{}.termination-log", c.name)),
            target: PathBuf::from(target),
            fallback_to_logs: c.termination_message_policy.as_deref()
                == Some("FallbackToLogsOnError"),
        })
    }

    /// The read-write bind mount of the file at the container's path; it goes after the
    /// volume mounts, so a path inside a volume is honoured.
    pub fn mount(&self) -> Mount {
        Mount {
            host: self.host.clone(),
            target: self.target.clone(),
            read_only: false,
        }
    }

    /// Creates or empties the file before a run, writable whatever user the container runs as
    /// (mode 0666, as the kubelet makes it).
    pub fn reset(&self) -> io::Result<()> {
        let file = std::fs::File::create(&self.host)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o666))
    }

    /// The terminated state's message once a run ended with `exit_code`: what the container
    /// wrote to the file; if that is empty, under FallbackToLogsOnError with a non-zero exit, the
    /// tail of the run's output (`log` from byte `log_start` on, where this run's output begins).
    /// A message already known (`existing`, e.g. why a probe killed the container) stays in
    /// front, as the kubelet puts the runtime's message before the container's.
    pub fn message(
        &self,
        existing: Option<String>,
        exit_code: i32,
        log: Option<&Path>,
        log_start: u64,
    ) -> Option<String> {
        let written = match read_tail(&self.host, 0, MAX_MESSAGE_BYTES) {
            Ok(bytes) => text(&bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => format!(
                "Error on reading termination log {}: {e}",
                self.host.display()
            ),
        };
        let own = match log {
            Some(log) if written.is_empty() && self.fallback_to_logs && exit_code != 0 => {
                match read_tail(log, log_start, MAX_LOG_BYTES) {
                    Ok(bytes) => text(last_lines(&bytes, MAX_LOG_LINES)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                    Err(e) => format!("Error on reading termination message from logs: {e}"),
                }
            }
            _ => written,
        };
        combine(existing, own)
    }
}

/// The last `max` bytes of the file at `path` from byte `start` on (fewer if it is shorter).
fn read_tail(path: &Path, start: u64, max: u64) -> io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let from = start.min(len).max(len.saturating_sub(max));
    file.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The last `lines` lines of `bytes` (a final newline ends the last line, it does not start an
/// empty one), as `tail -n` counts them.
pub fn last_lines(bytes: &[u8], lines: usize) -> &[u8] {
    if lines == 0 {
        return &[];
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == lines {
                return &bytes[i + 1..];
            }
        }
    }
    bytes
}

/// Bytes as message text: a character cut at the front by a byte limit is dropped, anything
/// else that is not UTF-8 becomes U+FFFD (as the API's JSON encoding would make it).
fn text(bytes: &[u8]) -> String {
    let cut = bytes
        .iter()
        .take(3)
        .take_while(|b| (0x80..0xc0).contains(*b))
        .count();
    String::from_utf8_lossy(&bytes[cut..]).into_owned()
}

/// A message already known, followed by the container's own (`"known: own"`); either alone
/// when the other is empty.
pub fn combine(existing: Option<String>, own: String) -> Option<String> {
    match existing.filter(|e| !e.is_empty()) {
        Some(e) if own.is_empty() => Some(e),
        Some(e) => Some(format!("{e}: {own}")),
        None if own.is_empty() => None,
        None => Some(own),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_counts_lines_like_tail() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"only", 1), b"only");
        assert_eq!(last_lines(b"a\nb\n", 0), b"");
        assert_eq!(last_lines(b"", 3), b"");
    }

    #[test]
    fn text_drops_a_character_cut_at_the_front() {
        let s = "héllo".as_bytes();
        assert_eq!(text(&s[2..]), "llo", "the second byte of é is dropped");
        assert_eq!(text(s), "héllo");
        assert_eq!(text(b"\xffx"), "\u{fffd}x");
    }

    #[test]
    fn an_existing_message_stays_in_front() {
        assert_eq!(combine(None, String::new()), None);
        assert_eq!(combine(None, "own".into()), Some("own".into()));
        assert_eq!(
            combine(Some("probe".into()), String::new()),
            Some("probe".into())
        );
        assert_eq!(
            combine(Some("probe".into()), "own".into()),
            Some("probe: own".into())
        );
        assert_eq!(
            combine(Some(String::new()), "own".into()),
            Some("own".into())
        );
    }

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn message_from_the_file_else_from_this_runs_log_on_error() {
        let dir =
            Dir(std::env::temp_dir().join(format!("sendense-termination-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        let container = |policy: &str| Container {
            name: "c".into(),
            termination_message_policy: Some(policy.into()),
            ..Default::default()
        };
        let t = TerminationLog::of(&container("FallbackToLogsOnError"), &dir.0).expect("path");
        assert_eq!(t.target, PathBuf::from(DEFAULT_PATH));
        assert!(t.fallback_to_logs);
        let log = dir.0.join("c.log");
        // An earlier run's output, then this run's: 100 lines, of which the last 80 count.
        let earlier = "earlier run\n";
        let this_run: String = (1..=100).map(|i| format!("line-{i}\n")).collect();
        std::fs::write(&log, format!("{earlier}{this_run}")).expect("log");
        let start = earlier.len() as u64;
        let expected: String = (21..=100).map(|i| format!("line-{i}\n")).collect();

        t.reset().expect("reset");
        assert_eq!(
            t.message(None, 2, Some(&log), start),
            Some(expected.clone())
        );
        assert_eq!(
            t.message(None, 0, Some(&log), start),
            None,
            "exit 0: no fallback"
        );
        assert_eq!(
            t.message(Some("liveness probe failed".into()), 0, Some(&log), start),
            Some("liveness probe failed".into())
        );
        // Only this run's output: a short run does not reach into the earlier one.
        std::fs::write(&log, "earlier run\nboom\n").expect("log");
        assert_eq!(t.message(None, 1, Some(&log), start), Some("boom\n".into()));
        // The log fallback keeps at most 2048 bytes.
        let long = "x".repeat(5000);
        std::fs::write(&log, &long).expect("log");
        assert_eq!(
            t.message(None, 1, Some(&log), 0).map(|m| m.len()),
            Some(MAX_LOG_BYTES as usize)
        );

        // What the container wrote wins over its log; the file keeps its last 4096 bytes.
        std::fs::write(&t.host, "own words").expect("message");
        assert_eq!(t.message(None, 1, Some(&log), 0), Some("own words".into()));
        let big = format!("{}{}", "a".repeat(10), "b".repeat(4096));
        std::fs::write(&t.host, &big).expect("message");
        assert_eq!(t.message(None, 0, None, 0), Some("b".repeat(4096)));
        // Each run starts from an empty file, writable by any user.
        t.reset().expect("reset");
        assert_eq!(t.message(None, 0, None, 0), None);
        let mode = std::fs::metadata(&t.host)
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o666);

        // File policy: never the log.
        let f = TerminationLog::of(&container("File"), &dir.0).expect("path");
        assert!(!f.fallback_to_logs);
        assert_eq!(f.message(None, 1, Some(&log), 0), None);

        let relative = Container {
            name: "r".into(),
            termination_message_path: Some("tmp/msg".into()),
            ..Default::default()
        };
        assert!(TerminationLog::of(&relative, &dir.0).is_err());
    }
}
