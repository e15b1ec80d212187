//! Glob patterns over full paths from a volume's root: `*` and `?` within one name, `[...]`
//! classes (`[!...]` or `[^...]` negated, `a-z` ranges, `\` escapes), `**` as a whole name
//! for any number of directories (none included). `*` also matches names starting with a dot:
//! a restore of `/home/*` means every home directory.

use std::fmt;

/// A pattern that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("pattern {pattern:?}: {why}")]
pub struct PatternError {
    pub pattern: String,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: any number of names.
    AnyDepth,
    /// A name with no wildcards.
    Literal(String),
    Wild(Vec<Token>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    AnyChar,
    AnyRun,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// A parsed glob pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    segments: Vec<Segment>,
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Pattern {
    /// Parses a pattern; a leading `/` is optional (patterns always start at the root).
    pub fn new(text: &str) -> Result<Self, PatternError> {
        let err = |why: &str| PatternError {
            pattern: text.to_owned(),
            why: why.to_owned(),
        };
        let mut segments = Vec::new();
        for part in text.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if part == ".." {
                return Err(err("`..` is not allowed in a pattern"));
            }
            if part == "**" {
                if segments.last() != Some(&Segment::AnyDepth) {
                    segments.push(Segment::AnyDepth);
                }
                continue;
            }
            let tokens = tokens(part).map_err(|why| err(&why))?;
            if tokens.iter().all(|t| matches!(t, Token::Char(_))) {
                let name = tokens
                    .iter()
                    .map(|t| match t {
                        Token::Char(c) => *c,
                        _ => unreachable!("all literal"),
                    })
                    .collect();
                segments.push(Segment::Literal(name));
            } else {
                segments.push(Segment::Wild(tokens));
            }
        }
        Ok(Self {
            text: text.to_owned(),
            segments,
        })
    }

    /// The leading names without wildcards: where a search for matches can start.
    pub fn literal_prefix(&self) -> Vec<&str> {
        self.segments
            .iter()
            .map_while(|s| match s {
                Segment::Literal(name) => Some(name.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Whether the pattern has no wildcards at all (names exactly one path).
    pub fn is_literal(&self) -> bool {
        self.segments
            .iter()
            .all(|s| matches!(s, Segment::Literal(_)))
    }

    /// Whether `path` (absolute, `/`-separated) matches the whole pattern.
    pub fn matches(&self, path: &str) -> bool {
        let names: Vec<&str> = split(path);
        match_from(&self.segments, &names, false)
    }

    /// Whether some path below the directory `dir` could match: a walk descends only there.
    pub fn may_match_below(&self, dir: &str) -> bool {
        let names: Vec<&str> = split(dir);
        match_from(&self.segments, &names, true)
    }
}

fn split(path: &str) -> Vec<&str> {
    path.split('/').filter(|p| !p.is_empty()).collect()
}

/// Matches names against segments; with `prefix`, running out of names while segments remain
/// counts as a match (something deeper may still match).
fn match_from(segments: &[Segment], names: &[&str], prefix: bool) -> bool {
    match segments.split_first() {
        None => names.is_empty(),
        Some((Segment::AnyDepth, rest)) => {
            if prefix {
                return true;
            }
            (0..=names.len()).any(|skip| match_from(rest, &names[skip..], prefix))
        }
        Some((segment, rest)) => match names.split_first() {
            None => prefix,
            Some((name, names)) => {
                let ok = match segment {
                    Segment::Literal(l) => l == name,
                    Segment::Wild(tokens) => match_name(tokens, &name.chars().collect::<Vec<_>>()),
                    Segment::AnyDepth => unreachable!("handled above"),
                };
                ok && match_from(rest, names, prefix)
            }
        },
    }
}

fn tokens(part: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = part.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(match c {
            '*' => {
                // `**` inside a name is the same as `*`.
                while chars.peek() == Some(&'*') {
                    chars.next();
                }
                Token::AnyRun
            }
            '?' => Token::AnyChar,
            '\\' => Token::Char(chars.next().ok_or("a trailing `\\` escapes nothing")?),
            '[' => {
                let negated = matches!(chars.peek(), Some('!') | Some('^'));
                if negated {
                    chars.next();
                }
                let mut ranges = Vec::new();
                let mut first = true;
                loop {
                    let c = chars.next().ok_or("`[` without a closing `]`")?;
                    if c == ']' && !first {
                        break;
                    }
                    first = false;
                    let lo = if c == '\\' {
                        chars.next().ok_or("`[` without a closing `]`")?
                    } else {
                        c
                    };
                    let mut lookahead = chars.clone();
                    if lookahead.next() == Some('-') && lookahead.peek().is_some_and(|&c| c != ']')
                    {
                        chars.next();
                        let hi = chars.next().ok_or("`[` without a closing `]`")?;
                        if hi < lo {
                            return Err(format!("range {lo}-{hi} is backwards"));
                        }
                        ranges.push((lo, hi));
                    } else {
                        ranges.push((lo, lo));
                    }
                }
                Token::Class { negated, ranges }
            }
            c => Token::Char(c),
        });
    }
    Ok(out)
}

/// Wildcard match of one name, iteratively with backtracking to the last `*` (linear for the
/// usual patterns, never exponential).
fn match_name(tokens: &[Token], name: &[char]) -> bool {
    let (mut t, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        let step = match tokens.get(t) {
            Some(Token::AnyRun) => {
                star = Some((t, n));
                t += 1;
                continue;
            }
            Some(Token::AnyChar) => true,
            Some(Token::Char(c)) => *c == name[n],
            Some(Token::Class { negated, ranges }) => {
                ranges
                    .iter()
                    .any(|&(lo, hi)| lo <= name[n] && name[n] <= hi)
                    != *negated
            }
            None => false,
        };
        if step {
            t += 1;
            n += 1;
        } else if let Some((st, sn)) = star {
            t = st + 1;
            n = sn + 1;
            star = Some((st, sn + 1));
        } else {
            return false;
        }
    }
    tokens[t..].iter().all(|t| matches!(t, Token::AnyRun))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, path: &str) -> bool {
        Pattern::new(p).unwrap().matches(path)
    }

    #[test]
    fn stars_and_questions_stay_within_one_name() {
        assert!(m("/etc/*.conf", "/etc/resolv.conf"));
        assert!(!m("/etc/*.conf", "/etc/ssh/sshd.conf"));
        assert!(m("etc/host?", "/etc/hosts"));
        assert!(!m("/etc/host?", "/etc/host"));
        assert!(m("/home/*", "/home/.hidden"));
        assert!(m("/a*b*c", "/aXXbYYbc"));
        assert!(!m("/a*b*c", "/aXXbYYbd"));
    }

    #[test]
    fn double_star_spans_any_depth_including_none() {
        assert!(m("/var/**/*.log", "/var/x.log"));
        assert!(m("/var/**/*.log", "/var/log/nginx/access.log"));
        assert!(!m("/var/**/*.log", "/srv/x.log"));
        assert!(m("/**", "/anything/at/all"));
        assert!(m("**/id_rsa", "/root/.ssh/id_rsa"));
    }

    #[test]
    fn classes_ranges_negation_and_escapes() {
        assert!(m("/f[0-9]", "/f7"));
        assert!(!m("/f[0-9]", "/fx"));
        assert!(m("/f[!0-9]", "/fx"));
        assert!(m("/f[]x]", "/f]"));
        assert!(m("/a\\*", "/a*"));
        assert!(!m("/a\\*", "/ab"));
        assert!(m("/f[a-]", "/f-"));
        assert!(Pattern::new("/f[ab").is_err());
        assert!(Pattern::new("/f[z-a]").is_err());
        assert!(Pattern::new("/a/../b").is_err());
    }

    #[test]
    fn a_walk_descends_only_where_a_match_can_be() {
        let p = Pattern::new("/home/*/docs/*.txt").unwrap();
        assert!(p.may_match_below("/home"));
        assert!(p.may_match_below("/home/ann/docs"));
        assert!(!p.may_match_below("/etc"));
        assert!(!p.may_match_below("/home/ann/music"));
        assert_eq!(p.literal_prefix(), vec!["home"]);
        assert!(Pattern::new("/etc/hosts").unwrap().is_literal());
    }
}
