//! The one YAML dialect every clustermesh component reads and writes.
//!
//! Configuration files, manifests, chart values and CLI state are YAML written by people
//! and by older releases of clustermesh, so they must keep meaning the same thing whatever
//! component reads them. This module pins the parser options once, for YAML 1.2's core
//! schema as clustermesh has always read it:
//!
//! - only `true`/`false` (any case style of those two words) are booleans; `yes`, `no`,
//!   `on` and `off` are strings;
//! - a scalar that is not quoted is still a string when a string is expected (`tag: 1.10`),
//!   and `null`/`~`/empty become the text itself for a string field;
//! - untyped, `0755` and `1_000` stay strings, `.inf`/`.nan` reach the target as floats;
//! - repeated keys reach the target type (a struct refuses a repeated field, a map keeps
//!   the last entry), and `<<` is an ordinary key, not a merge;
//! - collections may nest 128 levels; documents of any number of nodes are read (the
//!   caller bounds the size), alias expansion stays bounded against alias bombs;
//! - an error is one line, `<what> at line L, column C`, for messages and logs.
//!
//! The parser (`serde-saphyr`) has no YAML value type: untyped YAML is read into
//! `serde_json::Value`, the shape Kubernetes objects and Helm values have anyway.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A YAML document that could not be read into the requested type.
///
/// Its `Display` is one line and names the line and column when the parser knows them
/// (see [`Error::location`]).
pub type Error = serde_saphyr::Error;

/// A value that could not be written as YAML.
pub type SerializeError = serde_saphyr::SerializeError;

/// Deepest nesting of collections the parser accepts (the limit clustermesh has always
/// had).
pub const MAX_DEPTH: usize = 128;

/// The parser options of the clustermesh YAML dialect (see the module docs).
///
/// Callers with stricter needs start from these and change one field, e.g. refusing
/// repeated keys even where the target type would accept them.
#[must_use]
pub fn options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    // Large inputs are bounded by size where they come from (e.g. the dir source's
    // document limit); a node count limit would refuse big documents that are valid.
    budget.max_nodes = usize::MAX;
    budget.max_events = usize::MAX;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.strict_booleans = true;
    options.null_as_string = true;
    options.leading_zero_numbers_as_strings = true;
    options.underscored_numbers_as_strings = true;
    options.non_finite_float_policy = serde_saphyr::NonFiniteFloatPolicy::PassThrough;
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::PassThrough;
    options.merge_keys = serde_saphyr::MergeKeyPolicy::AsOrdinary;
    options.with_snippet = false;
    options
}

/// Reads one YAML document into `T`.
///
/// # Errors
/// The text is not YAML, holds more than one document, or does not match `T`.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    from_str_with(text, options())
}

/// Reads one YAML document into `T` with `options` (normally [`options`] with one field
/// changed).
///
/// # Errors
/// The text is not YAML, holds more than one document, or does not match `T`.
pub fn from_str_with<T: DeserializeOwned>(
    text: &str,
    options: serde_saphyr::Options,
) -> Result<T, Error> {
    serde_saphyr::from_str_with_options(text, options)
}

/// Reads one YAML document from bytes (UTF-8) into `T`.
///
/// # Errors
/// The bytes are not UTF-8 YAML, hold more than one document, or do not match `T`.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    serde_saphyr::from_slice_with_options(bytes, options())
}

/// Writes `value` as one block-style YAML document ending in a newline.
///
/// # Errors
/// `value` cannot be represented in YAML (e.g. a map with non-scalar keys).
pub fn to_string<T: Serialize>(value: &T) -> Result<String, SerializeError> {
    serde_saphyr::to_string(value)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;
    use serde_json::{json, Value};

    use super::*;

    #[test]
    fn untyped_scalars_read_as_yaml_1_2_core() {
        let v: Value = from_str(
            "a: yes\nb: true\nc: 0755\nd: 1_000\ne: 1.10\nf: 0x10\ng: ~\nh: ''\ni: -3\nj: TRUE\n",
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"a": "yes", "b": true, "c": "0755", "d": "1_000", "e": 1.1, "f": 16,
                   "g": null, "h": "", "i": -3, "j": true})
        );
    }

    #[test]
    fn a_string_field_takes_any_scalar_as_written() {
        #[derive(Deserialize)]
        struct S {
            a: String,
            b: String,
            c: String,
            d: Option<String>,
        }
        let s: S = from_str("a: 1.10\nb: true\nc: null\nd: null\n").unwrap();
        assert_eq!(
            (s.a.as_str(), s.b.as_str(), s.c.as_str()),
            ("1.10", "true", "null")
        );
        assert_eq!(s.d, None);
    }

    #[test]
    fn yaml_1_1_booleans_are_not_booleans() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct S {
            on: bool,
        }
        assert!(from_str::<S>("on: yes\n").is_err());
        assert!(from_str::<S>("on: True\n").unwrap().on);
    }

    #[test]
    fn repeated_keys_reach_the_target_and_merge_keys_are_ordinary() {
        let m: BTreeMap<String, u32> = from_str("a: 1\na: 2\n").unwrap();
        assert_eq!(m["a"], 2);
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct S {
            a: u32,
        }
        assert!(from_str::<S>("a: 1\na: 2\n").is_err());
        let v: Value = from_str("base: &b {x: 1}\nm:\n  <<: *b\n").unwrap();
        assert_eq!(v["m"], json!({"<<": {"x": 1}}));
    }

    #[test]
    fn an_error_is_one_line_with_its_position() {
        let e = from_str::<Value>("a: 1\nb: [\n").unwrap_err();
        let text = e.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains("line"), "{text}");
        assert!(e.location().is_some(), "{text}");
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted() {
        // Reading into a value recurses once per level; an unoptimised build needs about
        // 25 KiB of stack per level (an optimised one under 4 KiB), more than a test
        // thread's 2 MiB holds at the limit.
        let parse = |depth: usize| {
            let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            std::thread::Builder::new()
                .stack_size(8 << 20)
                .spawn(move || from_str::<Value>(&text).is_ok())
                .unwrap()
                .join()
                .unwrap()
        };
        assert!(parse(MAX_DEPTH - 1));
        assert!(!parse(MAX_DEPTH + 1));
        assert!(!parse(100_000));
    }

    #[test]
    fn documents_are_not_limited_by_their_number_of_nodes() {
        let items = 300_000;
        let text = format!("[{}1]", "1,".repeat(items - 1));
        let v: Value = from_str(&text).unwrap();
        assert_eq!(v.as_array().map(Vec::len), Some(items));
    }

    #[test]
    fn what_is_written_reads_back() {
        let v = json!({"name": "yes", "n": 3, "text": "a\nb\n", "list": ["0755", "x: y"]});
        let back: Value = from_str(&to_string(&v).unwrap()).unwrap();
        assert_eq!(back, v);
    }
}
