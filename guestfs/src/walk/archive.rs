//! Extraction into a tar archive: ustar headers, with a PAX extended header where ustar cannot
//! say it (times to the nanosecond, names longer than ustar holds, owners past 2^21 - 1).
//! GNU tar and bsdtar restore all of it. Holes are written as zeros (no sparse entries).

use std::io::{self, Read, Write};

use tar::{EntryType, Header};

use super::extract::{CHUNK, read_full};
use super::{Report, expand};
use crate::{FileSystem, Node, NodeKind, Timestamp};

/// The largest owner id an octal ustar field holds.
const USTAR_MAX_ID: u32 = 0o7777777;

/// Writes the selected paths (and everything in selected directories) to `out` as a tar
/// archive, named by their path from the volume's root without the leading `/`. An error
/// writing `out` ends the archive and is returned; a file that cannot be read is a failure in
/// the report (if it fails part way, the rest of its entry is zeros, so the archive stays
/// readable).
pub fn to_tar(
    fs: &dyn FileSystem,
    selection: &[(String, Node)],
    out: &mut dyn Write,
    max_depth: usize,
) -> io::Result<Report> {
    let mut report = Report::default();
    let entries = expand(fs, selection, max_depth, &mut report);
    let mut builder = tar::Builder::new(out);
    for (path, node) in entries {
        let name = path.trim_start_matches('/');
        if name.is_empty() {
            // The root itself: its contents follow as their own entries.
            continue;
        }
        let mut header = Header::new_ustar();
        let mut pax: Vec<(&str, String)> = Vec::new();
        let link_target = match node.kind {
            NodeKind::Directory => {
                header.set_entry_type(EntryType::Directory);
                None
            }
            NodeKind::File => {
                header.set_entry_type(EntryType::Regular);
                None
            }
            NodeKind::Symlink => match fs.read_link(&node) {
                Ok(target) => {
                    header.set_entry_type(EntryType::Symlink);
                    Some(String::from_utf8_lossy(&target).into_owned())
                }
                Err(e) => {
                    report.fail(&path, format!("reading the link: {e}"));
                    continue;
                }
            },
            NodeKind::Other => {
                report.skipped.push(path.clone());
                continue;
            }
        };
        if header.set_path(name).is_err() {
            pax.push(("path", name.to_owned()));
            header
                .set_path(short_name(name))
                .map_err(|e| io::Error::other(format!("{path}: {e}")))?;
        }
        if let Some(target) = &link_target
            && header.set_link_name(target).is_err()
        {
            pax.push(("linkpath", target.clone()));
        }
        header.set_mode(node.mode & 0o7777);
        for (key, id, set) in [
            ("uid", node.uid, Header::set_uid as fn(&mut Header, u64)),
            ("gid", node.gid, Header::set_gid),
        ] {
            if id > USTAR_MAX_ID {
                pax.push((key, id.to_string()));
                set(&mut header, 0);
            } else {
                set(&mut header, id as u64);
            }
        }
        header.set_mtime(node.mtime.secs.max(0) as u64);
        if node.mtime.nanos != 0 || node.mtime.secs < 0 {
            pax.push(("mtime", pax_time(node.mtime)));
        }
        pax.push(("atime", pax_time(node.atime)));
        let size = if node.kind == NodeKind::File {
            node.size
        } else {
            0
        };
        header.set_size(size);
        header.set_cksum();
        write_pax(&mut builder, name, &pax)?;
        if node.kind == NodeKind::File {
            let mut content = Content {
                fs,
                node: &node,
                pos: 0,
                failure: None,
            };
            builder.append(&header, &mut content)?;
            match content.failure {
                Some(why) => report.fail(&path, why),
                None => {
                    report.files += 1;
                    report.bytes += size;
                }
            }
        } else {
            builder.append(&header, io::empty())?;
            match node.kind {
                NodeKind::Directory => report.directories += 1,
                _ => report.symlinks += 1,
            }
        }
    }
    builder.finish()?;
    Ok(report)
}

/// A file's content as a reader of exactly its size: after a read error, zeros (the error is
/// kept for the report).
struct Content<'a> {
    fs: &'a dyn FileSystem,
    node: &'a Node,
    pos: u64,
    failure: Option<String>,
}

impl Read for Content<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.node.size - self.pos).min(buf.len().min(CHUNK) as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let buf = &mut buf[..want];
        let got = if self.failure.is_none() {
            match read_full(self.fs, self.node, self.pos, buf) {
                Ok(0) => {
                    self.failure = Some(format!(
                        "content ends at byte {}, before its size {}",
                        self.pos, self.node.size
                    ));
                    0
                }
                Ok(n) => n,
                Err(why) => {
                    self.failure = Some(why);
                    0
                }
            }
        } else {
            0
        };
        if got == 0 {
            buf.fill(0);
            self.pos += want as u64;
            return Ok(want);
        }
        self.pos += got as u64;
        Ok(got)
    }
}

/// A PAX time: seconds and nanoseconds as a decimal (`-1.5` is half a second before -1).
fn pax_time(t: Timestamp) -> String {
    if t.secs < 0 && t.nanos > 0 {
        format!("-{}.{:09}", -(t.secs + 1), 1_000_000_000 - t.nanos)
    } else {
        format!("{}.{:09}", t.secs, t.nanos)
    }
}

/// A stand-in ustar name for a path only the PAX header holds: its last 99 bytes (on a char
/// boundary), so that a reader without PAX support still gets a recognisable name.
fn short_name(name: &str) -> &str {
    let mut start = name.len().saturating_sub(99);
    while !name.is_char_boundary(start) {
        start += 1;
    }
    name[start..].trim_start_matches('/')
}

/// Writes a PAX extended header ('x') for the next entry, if there is anything to say.
fn write_pax(
    builder: &mut tar::Builder<&mut dyn Write>,
    name: &str,
    records: &[(&str, String)],
) -> io::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let mut data = Vec::new();
    for (key, value) in records {
        data.extend_from_slice(pax_record(key, value).as_bytes());
    }
    let mut header = Header::new_ustar();
    header.set_entry_type(EntryType::XHeader);
    let base = name.rsplit('/').next().unwrap_or(name);
    header.set_path(format!(
        "PaxHeaders/{}",
        short_name(base).chars().take(80).collect::<String>()
    ))?;
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_cksum();
    builder.append(&header, data.as_slice())
}

/// `"<length> <key>=<value>\n"`, the length counting its own digits.
fn pax_record(key: &str, value: &str) -> String {
    let body = key.len() + value.len() + 3; // space, '=', newline
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    format!("{len} {key}={value}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_count_their_own_length() {
        assert_eq!(pax_record("path", "a"), "9 path=a\n");
        let r = pax_record("path", &"a".repeat(91));
        assert_eq!(r.len().to_string(), r.split(' ').next().unwrap());
    }

    #[test]
    fn pax_times_keep_nanoseconds_and_sign() {
        assert_eq!(
            pax_time(Timestamp {
                secs: 1614834367,
                nanos: 123456789
            }),
            "1614834367.123456789"
        );
        assert_eq!(
            pax_time(Timestamp {
                secs: -2,
                nanos: 500_000_000
            }),
            "-1.500000000"
        );
    }
}
