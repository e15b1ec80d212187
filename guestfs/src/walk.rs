//! Paths over a [`FileSystem`]: resolving one, listing a tree, selecting by glob patterns, and
//! extracting what was selected into a directory ([`extract`]) or a tar archive ([`archive`]).
//!
//! Paths are absolute from the volume's root, `/`-separated. Listing and selection walk the
//! tree as stored (a symbolic link is listed, never followed); resolution follows symbolic
//! links to directories on the way (not in the last name), within the same file system.

pub mod archive;
pub mod extract;
pub mod glob;

use std::collections::HashSet;

use crate::{Error, FileSystem, Node, NodeKind, Result};
pub use glob::{Pattern, PatternError};

/// Linux's bound on symbolic links followed while resolving one path.
const MAX_SYMLINKS: usize = 40;
/// How deep listings and extraction go when the caller does not say.
pub const DEFAULT_MAX_DEPTH: usize = 256;

/// The node a path names. Symbolic links in the last name are not followed (the link itself
/// is returned); links to directories before it are, relative ones from the directory that
/// holds them, absolute ones from this file system's root.
pub fn resolve(fs: &dyn FileSystem, path: &str) -> Result<Node> {
    resolve_with(fs, path, false)
}

/// As [`resolve`], following a symbolic link in the last name too (where a search starts).
pub fn resolve_following(fs: &dyn FileSystem, path: &str) -> Result<Node> {
    resolve_with(fs, path, true)
}

fn resolve_with(fs: &dyn FileSystem, path: &str, follow_last: bool) -> Result<Node> {
    let root = fs.root()?;
    // The directories from the root to where we are (for `..`).
    let mut stack = vec![root.clone()];
    let mut pending: Vec<String> = names(path).into_iter().rev().map(str::to_owned).collect();
    let mut followed = 0;
    let mut current = root;
    while let Some(name) = pending.pop() {
        if current.kind != NodeKind::Directory {
            return Err(Error::NotADirectory(path.to_owned()));
        }
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            current = stack.last().cloned().expect("root stays");
            continue;
        }
        let entry = fs
            .read_dir(&current)?
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::NotFound(path.to_owned()))?;
        if entry.node.kind == NodeKind::Symlink && (follow_last || !pending.is_empty()) {
            followed += 1;
            if followed > MAX_SYMLINKS {
                return Err(Error::Corrupt {
                    fs: "path",
                    what: format!("{path}: more than {MAX_SYMLINKS} symbolic links"),
                });
            }
            let target = String::from_utf8_lossy(&fs.read_link(&entry.node)?).into_owned();
            if target.starts_with('/') {
                stack.truncate(1);
            }
            current = stack.last().cloned().expect("root stays");
            pending.extend(names(&target).into_iter().rev().map(str::to_owned));
            continue;
        }
        current = entry.node;
        stack.push(current.clone());
    }
    Ok(current)
}

/// The names of a path, without empty ones and `.`.
fn names(path: &str) -> Vec<&str> {
    path.split('/')
        .filter(|n| !n.is_empty() && *n != ".")
        .collect()
}

/// `parent` + `/` + `name`.
pub fn join(parent: &str, name: &str) -> String {
    if parent.ends_with('/') {
        format!("{parent}{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// Everything below `path` (not `path` itself), parents before children, down to `max_depth`
/// levels (1: the directory's own entries).
pub fn list(fs: &dyn FileSystem, path: &str, max_depth: usize) -> Result<Vec<(String, Node)>> {
    let dir = resolve(fs, path)?;
    if dir.kind != NodeKind::Directory {
        return Err(Error::NotADirectory(path.to_owned()));
    }
    let mut out = Vec::new();
    let start = canonical(path);
    walk(fs, &start, &dir, max_depth, &mut |_| true, &mut |p, n| {
        out.push((p.to_owned(), n.clone()))
    })?;
    Ok(out)
}

/// `/`-separated, absolute, no empty names or `.`.
fn canonical(path: &str) -> String {
    let n = names(path);
    if n.is_empty() {
        "/".into()
    } else {
        format!("/{}", n.join("/"))
    }
}

/// Depth-first, parents first; `descend` says which directories to enter. A directory's id is
/// remembered so that a corrupt tree with a cycle ends.
fn walk(
    fs: &dyn FileSystem,
    path: &str,
    dir: &Node,
    max_depth: usize,
    descend: &mut dyn FnMut(&str) -> bool,
    visit: &mut dyn FnMut(&str, &Node),
) -> Result<()> {
    let mut seen = HashSet::new();
    seen.insert(dir.id);
    walk_inner(fs, path, dir, max_depth, descend, visit, &mut seen)
}

fn walk_inner(
    fs: &dyn FileSystem,
    path: &str,
    dir: &Node,
    depth_left: usize,
    descend: &mut dyn FnMut(&str) -> bool,
    visit: &mut dyn FnMut(&str, &Node),
    seen: &mut HashSet<u64>,
) -> Result<()> {
    if depth_left == 0 {
        return Ok(());
    }
    for entry in fs.read_dir(dir)? {
        let child = join(path, &entry.name);
        visit(&child, &entry.node);
        if entry.node.kind == NodeKind::Directory && descend(&child) && seen.insert(entry.node.id) {
            walk_inner(
                fs,
                &child,
                &entry.node,
                depth_left - 1,
                descend,
                visit,
                seen,
            )?;
        }
    }
    Ok(())
}

/// What a set of patterns selected.
#[derive(Debug, Default)]
pub struct Selection {
    /// Matched paths and their nodes, each once, in the order found.
    pub matches: Vec<(String, Node)>,
    /// Patterns that matched nothing (callers report these as errors of their own).
    pub unmatched: Vec<String>,
}

/// The paths matching any of `patterns`. A pattern's leading names without wildcards are
/// resolved first (following directory links, as a shell would), then the tree below is
/// walked only where a match can be. A directory that matches is one match: extraction takes
/// what is inside it.
pub fn select(fs: &dyn FileSystem, patterns: &[Pattern], max_depth: usize) -> Result<Selection> {
    let mut selection = Selection::default();
    let mut found = HashSet::new();
    for pattern in patterns {
        let prefix = format!("/{}", pattern.literal_prefix().join("/"));
        // `/dirlink/*` searches the directory the link points to; `/dirlink` is the link.
        let start = match resolve_with(fs, &prefix, !pattern.is_literal()) {
            Ok(node) => node,
            Err(Error::NotFound(_) | Error::NotADirectory(_)) => {
                selection.unmatched.push(pattern.to_string());
                continue;
            }
            Err(e) => return Err(e),
        };
        // Set also when the path was already selected by an earlier pattern.
        let mut hit = false;
        let mut add = |path: &str, node: &Node| {
            if pattern.matches(path) {
                hit = true;
                if found.insert(path.to_owned()) {
                    selection.matches.push((path.to_owned(), node.clone()));
                }
            }
        };
        let start_path = canonical(&prefix);
        add(&start_path, &start);
        if !pattern.is_literal() && start.kind == NodeKind::Directory {
            let mut descend = |p: &str| pattern.may_match_below(p);
            walk(fs, &start_path, &start, max_depth, &mut descend, &mut add)?;
        }
        if !hit {
            selection.unmatched.push(pattern.to_string());
        }
    }
    Ok(selection)
}

/// One path that could not be restored, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub path: String,
    pub reason: String,
}

/// What an extraction did. Failures of single paths do not stop the others.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    /// Bytes of file content written (holes included in the count, not written).
    pub bytes: u64,
    /// Devices, FIFOs and sockets: listed, not extracted.
    pub skipped: Vec<String>,
    /// Paths whose owner could not be set (not running as root).
    pub ownership_not_set: Vec<String>,
    pub failures: Vec<Failure>,
}

impl Report {
    fn fail(&mut self, path: &str, reason: impl std::fmt::Display) {
        self.failures.push(Failure {
            path: path.to_owned(),
            reason: reason.to_string(),
        });
    }
}

/// A name from a directory that is safe to use as one name on the host.
fn safe_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Every path to extract: each selected one, and below each selected directory everything
/// in it, parents first; paths inside an already selected directory are not repeated.
fn expand(
    fs: &dyn FileSystem,
    selection: &[(String, Node)],
    max_depth: usize,
    report: &mut Report,
) -> Vec<(String, Node)> {
    let mut out: Vec<(String, Node)> = Vec::new();
    let mut seen = HashSet::new();
    for (path, node) in selection {
        let path = canonical(path);
        if !seen.insert(path.clone()) {
            continue;
        }
        out.push((path.clone(), node.clone()));
        if node.kind == NodeKind::Directory {
            let mut unsafe_names = Vec::new();
            let mut visit = |p: &str, n: &Node| {
                let name = p.rsplit('/').next().unwrap_or_default();
                if !safe_name(name) {
                    unsafe_names.push(p.to_owned());
                } else if seen.insert(p.to_owned()) {
                    out.push((p.to_owned(), n.clone()));
                }
            };
            if let Err(e) = walk(fs, &path, node, max_depth, &mut |_| true, &mut visit) {
                report.fail(&path, format!("listing the directory: {e}"));
            }
            for p in unsafe_names {
                report.fail(&p, "name cannot be used on this system");
            }
        }
    }
    out
}
