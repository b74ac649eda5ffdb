use super::*;

fn rules(text: &str) -> IgnoreRules {
    IgnoreRules::parse(text).unwrap()
}

#[test]
fn plain_name_matches_only_at_the_root() {
    let rules = rules("secret.txt\n");
    assert!(rules.excludes("secret.txt"));
    assert!(!rules.excludes("sub/secret.txt"));
}

#[test]
fn star_stops_at_slash() {
    let rules = rules("*.md\n");
    assert!(rules.excludes("README.md"));
    assert!(!rules.excludes("docs/guide.md"));
}

#[test]
fn double_star_matches_at_any_depth() {
    let rules = rules("**/*.md\n");
    assert!(rules.excludes("README.md"));
    assert!(rules.excludes("docs/guide.md"));
    assert!(rules.excludes("a/b/c/d.md"));
    assert!(!rules.excludes("a/b/c/d.txt"));
}

#[test]
fn double_star_in_the_middle_matches_zero_or_more_directories() {
    let rules = rules("src/**/test_*.py\n");
    assert!(rules.excludes("src/test_a.py"));
    assert!(rules.excludes("src/x/y/test_b.py"));
    assert!(!rules.excludes("lib/test_a.py"));
}

#[test]
fn trailing_double_star_matches_everything_below() {
    let rules = rules("build/**\n");
    assert!(rules.excludes("build/a"));
    assert!(rules.excludes("build/a/b/c"));
    assert!(!rules.excludes("builds"));
}

#[test]
fn leading_double_star_with_literal_rest_is_a_suffix_match() {
    let rules = rules("**/node_modules\n");
    assert!(rules.excludes("node_modules"));
    assert!(rules.excludes("web/node_modules/x.js"));
    assert!(!rules.excludes("web/node_modules_old"));
}

#[test]
fn excluded_directory_excludes_its_contents() {
    let rules = rules(".git\n");
    assert!(rules.excludes(".git"));
    assert!(rules.excludes(".git/objects/ab/cdef"));
    assert!(!rules.excludes(".gitignore"));
}

#[test]
fn exception_takes_a_file_back() {
    let rules = rules("*.log\n!keep.log\n");
    assert!(rules.excludes("debug.log"));
    assert!(!rules.excludes("keep.log"));
}

#[test]
fn last_matching_rule_wins() {
    let rules = rules("!keep.log\n*.log\n");
    assert!(rules.excludes("keep.log"));
}

#[test]
fn exception_inside_an_excluded_directory() {
    let rules = rules("docs\n!docs/README.md\n");
    assert!(rules.excludes("docs/other.md"));
    assert!(!rules.excludes("docs/README.md"));
    assert!(rules.may_include_inside("docs"));
    assert!(!rules.may_include_inside("other"));
}

#[test]
fn exception_with_leading_wildcard_does_not_reach_into_directories() {
    let rules = rules("docs\n!**/README.md\n");
    assert!(!rules.may_include_inside("docs"));
}

#[test]
fn leading_slash_and_dot_segments_are_cleaned() {
    let rules = rules("/tmp\n./cache/\nlogs//old/../current\n");
    assert!(rules.excludes("tmp/x"));
    assert!(rules.excludes("cache/y"));
    assert!(rules.excludes("logs/current/z"));
    assert!(!rules.excludes("logs/old/z"));
}

#[test]
fn comments_blank_lines_and_whitespace_are_ignored() {
    let rules = rules("# a comment\n\n   \n  spaced.txt  \n");
    assert!(rules.excludes("spaced.txt"));
    assert!(!rules.excludes("# a comment"));
}

#[test]
fn question_mark_matches_one_character_except_slash() {
    let rules = rules("file?.txt\na?b\n");
    assert!(rules.excludes("file1.txt"));
    assert!(!rules.excludes("file10.txt"));
    assert!(!rules.excludes("a/b"));
}

#[test]
fn character_classes_and_negation() {
    let rules = rules("data[0-9].csv\nlog[^a-z]\n");
    assert!(rules.excludes("data7.csv"));
    assert!(!rules.excludes("datax.csv"));
    assert!(rules.excludes("log1"));
    assert!(!rules.excludes("logs"));
}

#[test]
fn backslash_escapes_a_wildcard() {
    let rules = rules("literal\\*.txt\n");
    assert!(rules.excludes("literal*.txt"));
    assert!(!rules.excludes("literalx.txt"));
}

#[test]
fn keep_restores_an_excluded_dockerfile() {
    let mut rules = rules("*\n");
    rules.keep("Dockerfile");
    rules.keep(".dockerignore");
    assert!(!rules.excludes("Dockerfile"));
    assert!(!rules.excludes(".dockerignore"));
    assert!(rules.excludes("odoo.conf"));
}

#[test]
fn malformed_patterns_name_their_line() {
    for (text, line) in [
        ("ok\n[abc\n", 2),
        ("!\n", 1),
        ("a\\\n", 1),
        ("[]\n", 1),
        ("[z-a]\n", 1),
    ] {
        let err = IgnoreRules::parse(text).unwrap_err();
        assert_eq!(err.line, line, "{text:?}: {err}");
    }
}

#[test]
fn byte_order_mark_is_skipped() {
    let rules = rules("\u{feff}secret\n");
    assert!(rules.excludes("secret"));
}

#[test]
fn clean_follows_go_filepath_clean() {
    assert_eq!(clean(""), ".");
    assert_eq!(clean("a//b/./c/.."), "a/b");
    assert_eq!(clean("../a"), "../a");
    assert_eq!(clean("/../a"), "/a");
    assert_eq!(clean("a/../.."), "..");
    assert_eq!(clean("/"), "/");
}
