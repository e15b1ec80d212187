//! Shell-style name patterns, as a backup schedule selects VMs by name.

/// Whether `name` matches the whole of `pattern`, case-sensitively:
///
/// - `*` any run of characters (also none), `?` any one character;
/// - `[abc]` one of the listed characters, `[a-z]` one in the range, `[!a-z]` one not in it;
///   a `]` right after `[` or `[!` is a member (`[]x]`), a `-` first or last is literal;
/// - a `[` without a closing `]` is a literal `[`; there is no backslash escape: to match a
///   literal `*`, `?` or `[`, put it in a class (`[*]`).
///
/// Characters are Unicode scalar values, not bytes.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let tokens = parse(pattern);
    let name: Vec<char> = name.chars().collect();
    let (mut t, mut n) = (0, 0);
    // Where to resume after the last `*`: its token index and the name position it now covers.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match tokens.get(t) {
            Some(Token::Star) => {
                star = Some((t, n));
                t += 1;
            }
            Some(token) if token.matches(name[n]) => {
                t += 1;
                n += 1;
            }
            _ => match star {
                // Let the last `*` take one more character and try again from there.
                Some((star_t, star_n)) => {
                    star = Some((star_t, star_n + 1));
                    t = star_t + 1;
                    n = star_n + 1;
                }
                None => return false,
            },
        }
    }
    tokens[t..].iter().all(|token| matches!(token, Token::Star))
}

#[derive(Debug, PartialEq, Eq)]
enum Token {
    Literal(char),
    AnyChar,
    Star,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Token {
    fn matches(&self, c: char) -> bool {
        match self {
            Token::Literal(l) => *l == c,
            Token::AnyChar => true,
            Token::Star => false,
            Token::Class { negated, ranges } => {
                ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != *negated
            }
        }
    }
}

fn parse(pattern: &str) -> Vec<Token> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            // Runs of stars are one star (and keep the matcher linear in them).
            '*' if tokens.last() == Some(&Token::Star) => {}
            '*' => tokens.push(Token::Star),
            '?' => tokens.push(Token::AnyChar),
            '[' => match parse_class(&chars[i + 1..]) {
                Some((class, len)) => {
                    tokens.push(class);
                    i += len;
                }
                None => tokens.push(Token::Literal('[')),
            },
            c => tokens.push(Token::Literal(c)),
        }
        i += 1;
    }
    tokens
}

/// The class whose text (after its `[`) starts `rest`, and how many characters it took
/// (through its `]`); `None` when it never closes.
fn parse_class(rest: &[char]) -> Option<(Token, usize)> {
    let negated = rest.first() == Some(&'!');
    let mut i = usize::from(negated);
    let mut ranges = Vec::new();
    let mut first = true;
    while i < rest.len() {
        let c = rest[i];
        if c == ']' && !first {
            return Some((Token::Class { negated, ranges }, i + 1));
        }
        first = false;
        if rest.get(i + 1) == Some(&'-') && rest.get(i + 2).is_some_and(|&hi| hi != ']') {
            ranges.push((c, rest[i + 2]));
            i += 3;
        } else {
            ranges.push((c, c));
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[track_caller]
    fn yes(pattern: &str, names: &[&str]) {
        for name in names {
            assert!(
                glob_match(pattern, name),
                "{pattern:?} should match {name:?}"
            );
        }
    }

    #[track_caller]
    fn no(pattern: &str, names: &[&str]) {
        for name in names {
            assert!(
                !glob_match(pattern, name),
                "{pattern:?} should not match {name:?}"
            );
        }
    }

    #[test]
    fn literals_match_only_themselves_and_case_counts() {
        yes("web-01", &["web-01"]);
        no("web-01", &["Web-01", "web-011", "web-0", "", "xweb-01"]);
        yes("", &[""]);
        no("", &["a"]);
    }

    #[test]
    fn star_matches_any_run_including_none() {
        yes("web-*", &["web-", "web-01", "web-a-b-c"]);
        no("web-*", &["web", "db-web-01", "Web-01"]);
        yes("*-prod", &["-prod", "db-prod", "a-prod-prod"]);
        no("*-prod", &["db-prod-2"]);
        yes("*", &["", "anything at all"]);
        yes("a*b*c", &["abc", "aXbYc", "abbbc", "acbc"]);
        no("a*b*c", &["ab", "acb", "abcd"]);
        yes("**x**", &["x", "axb"]);
    }

    #[test]
    fn question_mark_matches_exactly_one_character() {
        yes("db-?", &["db-1", "db-x", "db-é"]);
        no("db-?", &["db-", "db-12"]);
        yes("??", &["ab"]);
        no("??", &["a", "abc"]);
    }

    #[test]
    fn classes_sets_ranges_and_negation() {
        yes("web-[abc]", &["web-a", "web-c"]);
        no("web-[abc]", &["web-d", "web-", "web-ab", "web-A"]);
        yes("node[0-9][0-9]", &["node00", "node42"]);
        no("node[0-9][0-9]", &["node4", "node4a", "node100"]);
        yes("[a-cx-z]", &["a", "b", "y"]);
        no("[a-cx-z]", &["d", "w"]);
        yes("vm[!x]", &["vm1", "vmy"]);
        no("vm[!x]", &["vmx", "vm", "vm12"]);
        yes("[!a-z]*", &["1abc", "Abc", "-"]);
        no("[!a-z]*", &["abc", ""]);
    }

    #[test]
    fn class_edge_cases_are_literal_where_shells_make_them_literal() {
        // `]` first in a class is a member; `-` first or last is literal.
        yes("[]x]", &["]", "x"]);
        yes("[!]]", &["a"]);
        no("[!]]", &["]"]);
        yes("[-a]", &["-", "a"]);
        yes("[a-]", &["-", "a"]);
        no("[a-]", &["b"]);
        // Special characters inside a class are plain.
        yes("web[*?]", &["web*", "web?"]);
        no("web[*?]", &["webx"]);
        // An unclosed `[` is a literal `[`.
        yes("a[b", &["a[b"]);
        no("a[b", &["ab"]);
        yes("[", &["["]);
    }

    #[test]
    fn backtracking_finds_a_match_the_first_star_split_misses() {
        yes("*a?c*", &["xxabcab", "aac"]);
        yes("*ab", &["aab", "abab"]);
        no("*ab", &["aba"]);
        let long = "a".repeat(200);
        no("*a*a*a*a*a*b", &[long.as_str()]);
    }
}
