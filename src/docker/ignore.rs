//! .dockerignore rules, applied the way the Docker CLI and engine apply them.
//!
//! The rules follow moby's patternmatcher (the package `docker build` uses):
//!
//! - Each line is trimmed. Blank lines and lines starting with `#` are skipped. A leading
//!   `!` makes the line an exception that takes matching paths back in.
//! - A pattern is cleaned like Go's `filepath.Clean` and loses a leading `/`, so `/foo`,
//!   `./foo` and `foo/` all mean `foo` at the context root. Unlike .gitignore, a pattern
//!   without `/` does not match at every depth: `*.md` matches `README.md`, not
//!   `docs/a.md`; `**/*.md` matches both.
//! - `*` matches any run of characters except `/`, `?` one character except `/`,
//!   `[a-z]` and `[^a-z]` a character class, `\` escapes the next character. `**/` matches
//!   any number of directories, none included, and a trailing `**` matches everything.
//! - A path is excluded when the last rule matching the path, or any of its parent
//!   directories, is not an exception. Excluding a directory therefore excludes its
//!   contents, unless a later exception names something inside it.
//!
//! Differences from moby, all in malformed or contrived patterns: `*` and `?` inside a
//! class are literal characters (Go's `filepath.Match` rule, where moby's regex
//! translation produces a broken class), and `^` outside a class is literal (moby turns it
//! into a regex anchor that can never match).

use std::fmt;

/// A malformed line in a .dockerignore file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(".dockerignore line {line}: invalid pattern {pattern:?}: {reason}")]
pub struct IgnoreError {
    pub line: usize,
    pub pattern: String,
    pub reason: &'static str,
}

/// The rules of one .dockerignore file.
#[derive(Debug, Clone, Default)]
pub struct IgnoreRules {
    rules: Vec<Rule>,
}

#[derive(Clone)]
struct Rule {
    exception: bool,
    /// The cleaned pattern, used to decide whether an excluded directory must be walked.
    cleaned: String,
    matcher: Matcher,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bang = if self.exception { "!" } else { "" };
        write!(f, "{bang}{}", self.cleaned)
    }
}

#[derive(Debug, Clone)]
enum Matcher {
    /// A leading `**` followed only by literal text: the path ends with that text.
    /// moby special-cases this form, so `**foo` also matches `barfoo`.
    Suffix(String),
    Glob(Vec<Token>),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Literal(char),
    /// `*`
    Star,
    /// `?`
    Question,
    Class(Class),
    /// `**` not at the end: nothing, or any text ending with `/`.
    AnyDirectories,
    /// `**` at the end: any text.
    AnyText,
}

#[derive(Debug, Clone, PartialEq)]
struct Class {
    negated: bool,
    ranges: Vec<(char, char)>,
}

impl Class {
    fn matches(&self, c: char) -> bool {
        let inside = self.ranges.iter().any(|&(low, high)| low <= c && c <= high);
        inside != self.negated
    }
}

impl IgnoreRules {
    /// Parses the text of a .dockerignore file.
    pub fn parse(text: &str) -> Result<IgnoreRules, IgnoreError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut rules = Vec::new();
        for (index, raw_line) in text.lines().enumerate() {
            if raw_line.starts_with('#') {
                continue;
            }
            let line = raw_line.trim();
            if line.is_empty() {
                continue;
            }
            rules.push(Rule::parse(line).map_err(|reason| IgnoreError {
                line: index + 1,
                pattern: line.to_string(),
                reason,
            })?);
        }
        Ok(IgnoreRules { rules })
    }

    /// Adds an exception for `path` when the rules exclude it. The Docker CLI does this for
    /// the Dockerfile and .dockerignore, which the engine needs whatever the file says.
    pub fn keep(&mut self, path: &str) {
        if self.excludes(path) {
            let rule = Rule::parse(&format!("!{path}")).expect("a plain path is a valid pattern");
            self.rules.push(rule);
        }
    }

    /// Tells whether the rules exclude `path`, a `/`-separated path relative to the context
    /// root.
    pub fn excludes(&self, path: &str) -> bool {
        let path = clean(path);
        let parents: Vec<&str> = parent_paths(&path).collect();
        let mut excluded = false;
        for rule in &self.rules {
            // Only a rule that would flip the current answer needs to be checked.
            if rule.exception != excluded {
                continue;
            }
            let matched = rule.matcher.matches(&path)
                || parents.iter().any(|parent| rule.matcher.matches(parent));
            if matched {
                excluded = !rule.exception;
            }
        }
        excluded
    }

    /// Tells whether an excluded directory must still be walked because an exception names
    /// a path inside it. Like Docker, this compares the directory with the start of each
    /// exception's literal pattern, so an exception such as `!**/keep` does not reach into
    /// excluded directories.
    pub fn may_include_inside(&self, directory: &str) -> bool {
        let prefix = format!("{}/", clean(directory));
        self.rules
            .iter()
            .filter(|rule| rule.exception)
            .any(|rule| format!("{}/", rule.cleaned).starts_with(&prefix))
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// Yields `a`, `a/b` for the path `a/b/c`: every proper parent directory.
fn parent_paths(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/')
        .map(move |(index, _)| &path[..index])
}

impl Rule {
    fn parse(line: &str) -> Result<Rule, &'static str> {
        let (exception, pattern) = match line.strip_prefix('!') {
            Some(rest) => (true, rest.trim()),
            None => (false, line),
        };
        if pattern.is_empty() {
            return Err("an exception needs a pattern after `!`");
        }
        let mut cleaned = clean(pattern);
        if cleaned.len() > 1 && cleaned.starts_with('/') {
            cleaned.remove(0);
        }
        let matcher = Matcher::compile(&cleaned)?;
        Ok(Rule {
            exception,
            cleaned,
            matcher,
        })
    }
}

/// Cleans a `/`-separated path lexically, as Go's `filepath.Clean` does: repeated `/`
/// collapse, `.` segments go, `..` removes the segment before it, and the empty path
/// becomes `.`.
pub fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => match segments.last() {
                Some(&last) if last != ".." => {
                    segments.pop();
                }
                _ if rooted => {}
                _ => segments.push(".."),
            },
            other => segments.push(other),
        }
    }
    let joined = segments.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

impl Matcher {
    fn compile(pattern: &str) -> Result<Matcher, &'static str> {
        let tokens = tokenize(pattern)?;
        if let Some(rest) = pattern.strip_prefix("**") {
            let literal_rest = tokens[1..].iter().all(|t| matches!(t, Token::Literal(_)));
            if literal_rest && !rest.is_empty() && !rest.contains('\\') {
                return Ok(Matcher::Suffix(rest.to_string()));
            }
        }
        Ok(Matcher::Glob(tokens))
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Matcher::Suffix(suffix) => {
                path.ends_with(suffix.as_str())
                    || suffix.strip_prefix('/').is_some_and(|rest| path == rest)
            }
            Matcher::Glob(tokens) => {
                let chars: Vec<char> = path.chars().collect();
                glob_matches(tokens, &chars)
            }
        }
    }
}

fn tokenize(pattern: &str) -> Result<Vec<Token>, &'static str> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                // `**/` is `**` that also consumes the separator.
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                let token = if i == chars.len() {
                    Token::AnyText
                } else {
                    Token::AnyDirectories
                };
                tokens.push(token);
                continue;
            }
            '*' => tokens.push(Token::Star),
            '?' => tokens.push(Token::Question),
            '\\' => {
                let escaped = chars.get(i + 1).ok_or("a trailing `\\` escapes nothing")?;
                tokens.push(Token::Literal(*escaped));
                i += 1;
            }
            '[' => {
                let (class, next) = parse_class(&chars, i + 1)?;
                tokens.push(Token::Class(class));
                i = next;
                continue;
            }
            other => tokens.push(Token::Literal(other)),
        }
        i += 1;
    }
    Ok(tokens)
}

/// Parses a class body starting after `[`; returns the class and the index after `]`.
fn parse_class(chars: &[char], start: usize) -> Result<(Class, usize), &'static str> {
    const UNTERMINATED: &str = "a `[` class has no closing `]`";
    let mut i = start;
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    loop {
        let c = *chars.get(i).ok_or(UNTERMINATED)?;
        if c == ']' {
            if ranges.is_empty() {
                return Err("a `[]` class is empty");
            }
            return Ok((Class { negated, ranges }, i + 1));
        }
        let (low, after_low) = class_char(chars, i)?;
        i = after_low;
        let mut high = low;
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&c| c != ']') {
            let (end, after_high) = class_char(chars, i + 1)?;
            high = end;
            i = after_high;
            if high < low {
                return Err("a class range runs backwards");
            }
        }
        ranges.push((low, high));
    }
}

/// Reads one possibly escaped character of a class.
fn class_char(chars: &[char], i: usize) -> Result<(char, usize), &'static str> {
    match chars.get(i) {
        Some('\\') => {
            let escaped = chars.get(i + 1).ok_or("a trailing `\\` escapes nothing")?;
            Ok((*escaped, i + 2))
        }
        Some(&c) => Ok((c, i + 1)),
        None => Err("a `[` class has no closing `]`"),
    }
}

/// Matches a whole path against glob tokens, backtracking over `*` and `**`.
fn glob_matches(tokens: &[Token], path: &[char]) -> bool {
    let Some((token, rest)) = tokens.split_first() else {
        return path.is_empty();
    };
    match token {
        Token::Literal(c) => path.first() == Some(c) && glob_matches(rest, &path[1..]),
        Token::Question => {
            path.first().is_some_and(|&c| c != '/') && glob_matches(rest, &path[1..])
        }
        Token::Class(class) => {
            path.first().is_some_and(|&c| class.matches(c)) && glob_matches(rest, &path[1..])
        }
        Token::Star => {
            let limit = path.iter().position(|&c| c == '/').unwrap_or(path.len());
            (0..=limit).any(|skip| glob_matches(rest, &path[skip..]))
        }
        Token::AnyText => true,
        Token::AnyDirectories => {
            glob_matches(rest, path)
                || path
                    .iter()
                    .enumerate()
                    .filter(|(_, &c)| c == '/')
                    .any(|(index, _)| glob_matches(rest, &path[index + 1..]))
        }
    }
}

#[cfg(test)]
mod tests;
