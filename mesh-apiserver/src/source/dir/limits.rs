//! Limits a manifest must meet before the YAML parser sees it.
//!
//! Nesting is what makes YAML expensive to read. libyaml (behind go-yaml and most YAML
//! tooling) spends time roughly quadratic in the nesting depth of flow collections: a
//! 200 KB file of 100,000 nested lists kept it busy for more than a minute. Reading a
//! document into a value recurses once per level, so depth costs stack too. A parser's own
//! depth limit (128 in [`clustermesh_api::yaml`]) only applies once it has got that far.
//! So every document is checked here first, in one linear pass that stops at the first
//! level over [`MAX_NESTING_DEPTH`], and files and documents over a size limit are never
//! parsed at all.
//!
//! Measured on this project's 2-core CI machine (optimised build): Kubernetes objects
//! parse at about 0.25 s per MB, documents nested at the limit at about 0.75 s per MB, so
//! a document at [`MAX_DOCUMENT_SIZE`] parses in one to three seconds and a whole file at
//! [`MAX_FILE_SIZE`] in about ten at worst, off the async runtime.

/// Largest manifest file read. A Kubernetes object is at most 1.5 MiB in etcd and the
/// Kubernetes API server refuses request bodies over 3 MiB, so 16 MiB holds thousands of
/// real objects while keeping the parse of one file to a few seconds of one core.
pub const MAX_FILE_SIZE: u64 = 16 * 1024 * 1024;

/// Largest YAML document (the text between two `---` markers). One Kubernetes object
/// is at most 3 MiB when the API server accepts it; 4 MiB leaves room for YAML's
/// layout. A `kind: List` is one document: split a bigger one into one document per item.
pub const MAX_DOCUMENT_SIZE: usize = 4 * 1024 * 1024;

/// Deepest nesting of collections (mappings and sequences, block or flow) in a document.
/// A Pod nests about 10 levels, a CustomResourceDefinition's schema a few dozen; 100 is
/// far above that, below the parser's own depth limit of 128 (so this check, with its
/// clear message, is the one that fires), and keeps parsing linear in size.
pub const MAX_NESTING_DEPTH: usize = 100;

/// A limit a manifest file or document is over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    /// The file is bigger than [`MAX_FILE_SIZE`].
    #[error("file is {size} bytes, over the limit of {limit} bytes per manifest file")]
    FileSize {
        /// Size of the file.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A document is bigger than [`MAX_DOCUMENT_SIZE`].
    #[error("document is {size} bytes, over the limit of {limit} bytes per YAML document")]
    DocumentSize {
        /// Size of the document.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A document nests collections deeper than [`MAX_NESTING_DEPTH`].
    #[error("collections nest deeper than the limit of {limit} levels")]
    NestingDepth {
        /// The limit.
        limit: usize,
    },
}

/// Checks one document against the size and depth limits.
///
/// # Errors
/// The limit it is over, with the 0-based line (within `doc`) where that was seen.
pub(super) fn check_document(doc: &str) -> Result<(), (usize, LimitExceeded)> {
    if doc.len() > MAX_DOCUMENT_SIZE {
        return Err((
            0,
            LimitExceeded::DocumentSize {
                size: doc.len(),
                limit: MAX_DOCUMENT_SIZE,
            },
        ));
    }
    match first_line_over_depth(doc.as_bytes(), MAX_NESTING_DEPTH) {
        Some(line) => Err((
            line,
            LimitExceeded::NestingDepth {
                limit: MAX_NESTING_DEPTH,
            },
        )),
        None => Ok(()),
    }
}

/// Where the lexer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Between tokens.
    Token,
    /// In a plain (unquoted) scalar.
    Plain,
    /// In a `'single-quoted'` scalar.
    Single,
    /// In a `"double-quoted"` scalar.
    Double,
    /// In a `#` comment.
    Comment,
    /// In the content of a `|` or `>` block scalar; lines indented deeper than the
    /// enclosing block collection's column belong to it.
    BlockScalar,
}

/// One open block collection: its column and whether it is a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Level {
    column: usize,
    sequence: bool,
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t' || b == b'\r'
}

fn is_blankz(bytes: &[u8], i: usize) -> bool {
    bytes.get(i).is_none_or(|&b| is_blank(b) || b == b'\n')
}

/// The 0-based line where the nesting of collections first exceeds `limit`, if it does.
///
/// A lexer that follows libyaml's tokenizing rules (flow indicators, quoted and plain
/// scalars, comments, block scalars, tags and anchors) far enough to know which `[`, `{`,
/// `]` and `}` open and close flow collections, and counts block collections by their
/// indentation (a `- ` entry and a mapping at the same column as its parent key are a
/// level each). It may count a level too many (a scalar after `- `, a continued plain
/// scalar), never the flow levels that make the parser slow too few for a document the
/// parser accepts. One pass, no allocation beyond the stack of block levels.
fn first_line_over_depth(bytes: &[u8], limit: usize) -> Option<usize> {
    let mut flow = 0usize;
    let mut levels: Vec<Level> = Vec::new();
    let mut mode = Mode::Token;
    let mut line = 0usize;
    let mut i = 0usize;
    let mut line_start = true;
    while i < bytes.len() {
        if line_start {
            line_start = false;
            let indent = bytes[i..].iter().take_while(|&&b| b == b' ').count();
            let rest = i + indent;
            let blank_line = bytes
                .get(rest)
                .is_none_or(|&b| b == b'\n' || b == b'\r' || b == b'\t');
            let parent = levels.last().map(|l| l.column);
            let deeper = parent.is_none_or(|p| indent > p);
            match mode {
                Mode::BlockScalar if blank_line || deeper => {
                    i = bytes[i..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(bytes.len(), |p| i + p);
                    continue;
                }
                Mode::BlockScalar => mode = Mode::Token,
                // A block plain scalar continues on deeper lines; anything else ends it.
                Mode::Plain if flow == 0 && !blank_line && !deeper => mode = Mode::Token,
                _ => {}
            }
            i = rest;
            if mode == Mode::Token && flow == 0 && !blank_line && bytes[rest] != b'#' {
                i = block_line(bytes, rest, indent, &mut levels);
                if levels.len() > limit {
                    return Some(line);
                }
            }
            continue;
        }
        let c = bytes[i];
        if c == b'\n' {
            line += 1;
            line_start = true;
            if mode == Mode::Comment {
                mode = Mode::Token;
            }
            i += 1;
            continue;
        }
        match mode {
            Mode::Comment | Mode::BlockScalar => i += 1,
            Mode::Single => {
                if c == b'\'' {
                    if bytes.get(i + 1) == Some(&b'\'') {
                        i += 1;
                    } else {
                        mode = Mode::Token;
                    }
                }
                i += 1;
            }
            Mode::Double => {
                if c == b'\\' {
                    i += 1;
                } else if c == b'"' {
                    mode = Mode::Token;
                }
                i += 1;
            }
            Mode::Plain => {
                let after_blank = i == 0 || is_blank(bytes[i - 1]) || bytes[i - 1] == b'\n';
                let next = bytes.get(i + 1).copied();
                if c == b'#' && after_blank {
                    mode = Mode::Comment;
                } else if (c == b':' && is_blankz(bytes, i + 1))
                    || (flow > 0
                        && (matches!(c, b',' | b'[' | b']' | b'{' | b'}')
                            || (c == b':'
                                && matches!(next, Some(b',' | b'?' | b'[' | b']' | b'{' | b'}')))))
                {
                    // The indicator is read as a token.
                    mode = Mode::Token;
                    continue;
                }
                i += 1;
            }
            Mode::Token => {
                match c {
                    b'[' | b'{' => {
                        flow += 1;
                        if levels.len() + flow > limit {
                            return Some(line);
                        }
                    }
                    b']' | b'}' => flow = flow.saturating_sub(1),
                    b'#' => mode = Mode::Comment,
                    b'\'' => mode = Mode::Single,
                    b'"' => mode = Mode::Double,
                    b'&' | b'*' => {
                        while bytes
                            .get(i + 1)
                            .is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                        {
                            i += 1;
                        }
                    }
                    b'!' => {
                        // A tag runs to the next blank (or flow indicator in flow
                        // context); a verbatim tag `!<…>` to its `>`.
                        let verbatim = bytes.get(i + 1) == Some(&b'<');
                        while let Some(&b) = bytes.get(i + 1) {
                            if b == b'\n'
                                || (verbatim && bytes[i] == b'>')
                                || (!verbatim
                                    && (is_blank(b)
                                        || (flow > 0
                                            && matches!(b, b',' | b'[' | b']' | b'{' | b'}'))))
                            {
                                break;
                            }
                            i += 1;
                        }
                    }
                    b'|' | b'>' if flow == 0 => {
                        // The header runs to the end of the line; content lines follow.
                        mode = Mode::BlockScalar;
                    }
                    b',' => {}
                    b'-' | b'?' | b':' if is_blankz(bytes, i + 1) || (flow > 0 && c != b'-') => {}
                    _ if is_blank(c) => {}
                    _ => {
                        mode = Mode::Plain;
                        continue;
                    }
                }
                i += 1;
            }
        }
    }
    None
}

/// Records the block collections a line in block context opens: the line's first token
/// at `indent`, then one level per compact `- ` entry. Returns where the line's content
/// after those entries starts.
fn block_line(bytes: &[u8], start: usize, indent: usize, levels: &mut Vec<Level>) -> usize {
    let is_entry = |at: usize| bytes.get(at) == Some(&b'-') && is_blankz(bytes, at + 1);
    let mut at = start;
    let mut column = indent;
    while levels.last().is_some_and(|l| l.column > column) {
        levels.pop();
    }
    let mut sequence = is_entry(at);
    match levels.last().copied() {
        // The same collection goes on.
        Some(top) if top.column == column && top.sequence == sequence => {}
        // A sequence at its key's column (`key:` then `- item`) nests in that mapping.
        Some(top) if top.column == column && sequence => levels.push(Level { column, sequence }),
        // A key after such a sequence: the sequence is over.
        Some(top) if top.column == column => {
            levels.pop();
            if levels.last() != Some(&Level { column, sequence }) {
                levels.push(Level { column, sequence });
            }
        }
        _ => levels.push(Level { column, sequence }),
    }
    // Compact nesting on the same line: `- - item`, `- key: value`.
    while sequence {
        at += 1;
        while bytes.get(at).is_some_and(|&b| b == b' ') {
            at += 1;
        }
        if is_blankz(bytes, at) || bytes[at] == b'#' {
            break;
        }
        column = indent + (at - start);
        sequence = is_entry(at);
        levels.push(Level { column, sequence });
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_over(text: &str, limit: usize) -> Option<usize> {
        first_line_over_depth(text.as_bytes(), limit)
    }

    /// The smallest limit the text is not over.
    fn depth(text: &str) -> usize {
        (0..1000)
            .find(|&l| depth_over(text, l).is_none())
            .unwrap_or(1000)
    }

    /// The lexer counts the real depth, or one more (the line's first token is taken for
    /// a block collection).
    fn assert_depth(text: &str, real: usize) {
        let d = depth(text);
        assert!((real..=real + 1).contains(&d), "{text:?}: {d}, real {real}");
    }

    #[test]
    fn flow_nesting_is_counted() {
        assert_depth("[[[1]]]", 3);
        assert_depth("{a: {b: [1, {c: d}]}}", 4);
        assert_depth("k: [1, 2]\n", 2);
        assert_depth("[a,\n [b,\n  [c]]]\n", 3);
    }

    #[test]
    fn block_nesting_is_counted() {
        assert_depth("a: 1\n", 1);
        assert_depth("a:\n  b:\n    c: 1\n  d: 2\ne: 3\n", 3);
        assert_depth("a:\n- b:\n  - 1\n", 4);
        assert_depth("- - - x\n", 3);
        assert_eq!(depth("a:\n- 1\n- 2\nb: 3\nc: 4\n"), depth("a:\n- 1\n"));
    }

    #[test]
    fn brackets_in_scalars_and_comments_do_not_count() {
        let opens = "[".repeat(200);
        for text in [
            format!("a: \"{opens}\"\n"),
            format!("a: '{opens}'\n"),
            format!("a: x{opens}\n"),
            format!("a: 1 # {opens}\n"),
            format!("# {opens}\na: 1\n"),
            format!("a: |\n  {opens}\n  \"\nb: 2\n"),
            format!("a: >-\n  {opens}\n\n  {opens}\nb: [1]\n"),
            format!("a: \"x\\\"{opens}\"\n"),
            format!("a: 'it''s {opens}'\n"),
        ] {
            assert!(depth(&text) <= 2, "{text}: {}", depth(&text));
        }
    }

    #[test]
    fn closers_in_scalars_do_not_hide_real_nesting() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for text in [
            // A quote inside a plain scalar starts no string.
            format!("[a\"b, {deep}]\n"),
            // A plain scalar continued on the next line with a quote in it.
            format!("a: b\n  \"x\nc: {deep}\nd: \"\n"),
            // Flow plain scalars continue across lines.
            format!("[a\n \"b, {deep}, \"]\n"),
            // Closers in strings and comments are not real.
            format!("[\"]]]]\", '}}}}', # ]]]]\n {deep}]\n"),
            format!("a: !tag'x {deep}\n"),
        ] {
            assert!(depth(&text) > 100, "{text}");
        }
    }

    #[test]
    fn hostile_nesting_is_found_fast() {
        let lists = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(depth_over(&lists, MAX_NESTING_DEPTH), Some(0));
        let maps = format!("{}1{}", "{a: ".repeat(100_000), "}".repeat(100_000));
        assert!(depth_over(&maps, MAX_NESTING_DEPTH).is_some());
        let mut block = String::new();
        for i in 0..200 {
            block.push_str(&" ".repeat(i));
            block.push_str("a:\n");
        }
        assert_eq!(
            depth_over(&block, MAX_NESTING_DEPTH),
            Some(MAX_NESTING_DEPTH)
        );
        let compact = format!("{}x\n", "- ".repeat(100_000));
        assert_eq!(depth_over(&compact, MAX_NESTING_DEPTH), Some(0));
    }

    #[test]
    fn document_limits_name_the_limit() {
        let big = "a: b\n".repeat(MAX_DOCUMENT_SIZE / 5 + 1);
        let (_, e) = check_document(&big).unwrap_err();
        assert!(
            e.to_string().contains(&MAX_DOCUMENT_SIZE.to_string()),
            "{e}"
        );
        let deep = format!("k: {}", "[".repeat(MAX_NESTING_DEPTH + 1));
        let (_, e) = check_document(&deep).unwrap_err();
        assert_eq!(
            e,
            LimitExceeded::NestingDepth {
                limit: MAX_NESTING_DEPTH
            }
        );
    }

    fn value_depth(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Array(s) => 1 + s.iter().map(value_depth).max().unwrap_or(0),
            serde_json::Value::Object(m) => 1 + m.values().map(value_depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    fn arbitrary_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<i64>().prop_map(serde_json::Value::from),
            "[ -~]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(12, 64, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z:#\\[\\]\"' -]{1,8}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Whatever the serializers write, the lexer counts at least the real depth.
        #[test]
        fn never_counts_less_than_the_parsed_depth(value in arbitrary_value()) {
            let real = value_depth(&value);
            let block = clustermesh_api::yaml::to_string(&value).unwrap();
            proptest::prop_assert!(depth(&block) >= real, "{block}");
            let json = serde_json::to_string(&value).unwrap();
            proptest::prop_assert!(depth(&json) >= real, "{json}");
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            proptest::prop_assert!(depth(&pretty) >= real, "{pretty}");
        }
    }
}
