//! One string printed as a YAML document the way libyaml prints it.
//!
//! Helm's `toYaml` output comes from go-yaml v2, a port of libyaml's emitter, so the
//! chart renderer has to choose the same scalar style as libyaml does (plain,
//! single-quoted, double-quoted or literal block) and write it the same way, byte for
//! byte. No maintained Rust YAML crate uses libyaml's emitter, so its rules are restated
//! here (`yaml_emitter_analyze_scalar`, `yaml_emitter_select_scalar_style` and the
//! `write_*_scalar` functions of libyaml 0.2.5, with unlimited line width and Unicode
//! output), together with the one decision the caller adds before asking the emitter: a
//! string that a YAML 1.2 core-schema reader would take for something else (`true`,
//! `1`, `0755`, `null`, ...) asks for single quotes.

/// The indentation of a block scalar's content at the top level of a document.
const ROOT_INDENT: usize = 2;

/// `s` as a whole YAML document, ending in a newline, as libyaml prints it.
pub(super) fn document(s: &str) -> String {
    let analysis = Analysis::of(s);
    let requested = if s.contains('\n') {
        Style::Literal
    } else if reads_as_non_string(s) {
        Style::SingleQuoted
    } else {
        Style::Plain
    };
    let mut out = String::new();
    match analysis.select(requested) {
        Style::Plain => out.push_str(s),
        Style::SingleQuoted => single_quoted(s, &mut out),
        Style::DoubleQuoted => double_quoted(s, &mut out),
        Style::Literal => literal(s, &mut out),
    }
    // The end of the document starts a new line, unless the scalar ended with a break.
    if !out.ends_with(is_break) {
        out.push('\n');
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Plain,
    SingleQuoted,
    DoubleQuoted,
    Literal,
}

/// What libyaml's emitter learns about a scalar before choosing its style.
#[derive(Debug, Default)]
struct Analysis {
    block_plain_allowed: bool,
    single_quoted_allowed: bool,
    block_allowed: bool,
}

/// Characters libyaml writes as they are (`IS_PRINTABLE`).
fn is_printable(c: char) -> bool {
    matches!(c, '\n' | ' '..='~' | '\u{a0}'..='\u{d7ff}' | '\u{10000}'..)
        || (('\u{e000}'..='\u{fffd}').contains(&c) && c != '\u{feff}')
}

/// libyaml's line breaks (`IS_BREAK`).
fn is_break(c: char) -> bool {
    matches!(c, '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// A blank, a break, or the end of the string (`IS_BLANKZ`).
fn is_blankz(c: Option<char>) -> bool {
    c.is_none_or(|c| c == ' ' || c == '\t' || is_break(c))
}

impl Analysis {
    fn of(s: &str) -> Self {
        if s.is_empty() {
            return Analysis {
                block_plain_allowed: true,
                single_quoted_allowed: true,
                block_allowed: false,
            };
        }
        let chars: Vec<char> = s.chars().collect();
        let mut block_indicators = s.starts_with("---") || s.starts_with("...");
        let mut line_breaks = false;
        let mut special_characters = false;
        let (mut leading_space, mut leading_break) = (false, false);
        let (mut trailing_space, mut trailing_break) = (false, false);
        let (mut break_space, mut space_break) = (false, false);
        let (mut previous_space, mut previous_break) = (false, false);
        let mut preceded_by_whitespace = true;
        for (i, &c) in chars.iter().enumerate() {
            let followed_by_whitespace = is_blankz(chars.get(i + 1).copied());
            let (first, last) = (i == 0, i + 1 == chars.len());
            if first {
                if "#,[]{}&*!|>'\"%@`".contains(c)
                    || (matches!(c, '?' | ':' | '-') && followed_by_whitespace)
                {
                    block_indicators = true;
                }
            } else if (c == ':' && followed_by_whitespace) || (c == '#' && preceded_by_whitespace) {
                block_indicators = true;
            }
            if !is_printable(c) {
                special_characters = true;
            }
            if is_break(c) {
                line_breaks = true;
            }
            if c == ' ' {
                leading_space |= first;
                trailing_space |= last;
                break_space |= previous_break;
                (previous_space, previous_break) = (true, false);
            } else if is_break(c) {
                leading_break |= first;
                trailing_break |= last;
                space_break |= previous_space;
                (previous_space, previous_break) = (false, true);
            } else {
                (previous_space, previous_break) = (false, false);
            }
            preceded_by_whitespace = is_blankz(Some(c));
        }
        let mut a = Analysis {
            block_plain_allowed: true,
            single_quoted_allowed: true,
            block_allowed: true,
        };
        if leading_space || leading_break || trailing_space || trailing_break {
            a.block_plain_allowed = false;
        }
        if trailing_space {
            a.block_allowed = false;
        }
        if break_space {
            a.block_plain_allowed = false;
            a.single_quoted_allowed = false;
        }
        if space_break || special_characters {
            a = Analysis::default();
        }
        if line_breaks || block_indicators {
            a.block_plain_allowed = false;
        }
        a
    }

    /// The style libyaml uses for a scalar at the top level of a document.
    fn select(&self, requested: Style) -> Style {
        let mut style = requested;
        if style == Style::Plain && !self.block_plain_allowed {
            style = Style::SingleQuoted;
        }
        if style == Style::SingleQuoted && !self.single_quoted_allowed {
            style = Style::DoubleQuoted;
        }
        if style == Style::Literal && !self.block_allowed {
            style = Style::DoubleQuoted;
        }
        style
    }
}

/// `'...'`, quotes doubled; a line break other than `\n` is written as it is and the
/// text after it is indented.
fn single_quoted(s: &str, out: &mut String) {
    out.push('\'');
    let mut breaks = false;
    for c in s.chars() {
        if is_break(c) {
            out.push(c);
            breaks = true;
        } else {
            if breaks {
                out.push_str(&" ".repeat(ROOT_INDENT));
            }
            if c == '\'' {
                out.push('\'');
            }
            out.push(c);
            breaks = false;
        }
    }
    if breaks {
        out.push_str(&" ".repeat(ROOT_INDENT));
    }
    out.push('\'');
}

/// `"..."` with libyaml's escapes.
fn double_quoted(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        if !is_printable(c) || c == '\u{feff}' || is_break(c) || c == '"' || c == '\\' {
            out.push('\\');
            match c {
                '\0' => out.push('0'),
                '\u{7}' => out.push('a'),
                '\u{8}' => out.push('b'),
                '\t' => out.push('t'),
                '\n' => out.push('n'),
                '\u{b}' => out.push('v'),
                '\u{c}' => out.push('f'),
                '\r' => out.push('r'),
                '\u{1b}' => out.push('e'),
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                '\u{85}' => out.push('N'),
                '\u{a0}' => out.push('_'),
                '\u{2028}' => out.push('L'),
                '\u{2029}' => out.push('P'),
                c if u32::from(c) <= 0xff => out.push_str(&format!("x{:02X}", u32::from(c))),
                c if u32::from(c) <= 0xffff => out.push_str(&format!("u{:04X}", u32::from(c))),
                c => out.push_str(&format!("U{:08X}", u32::from(c))),
            }
        } else {
            out.push(c);
        }
    }
    out.push('"');
}

/// A `|` block: indentation indicator when the text starts with a space or a break,
/// chomping indicator from how it ends, lines indented below the top level.
fn literal(s: &str, out: &mut String) {
    out.push('|');
    if s.starts_with(' ') || s.starts_with(is_break) {
        out.push_str(&ROOT_INDENT.to_string());
    }
    // `-` strips the final break the text lacks, `+` keeps the final breaks beyond one.
    let mut tail = s.chars().rev();
    match (tail.next(), tail.next()) {
        (Some(last), _) if !is_break(last) => out.push('-'),
        (Some(_), None) => out.push('+'),
        (Some(_), Some(before)) if is_break(before) => out.push('+'),
        (Some(_), Some(_)) => {}
        (None, _) => out.push('-'),
    }
    out.push('\n');
    let mut breaks = true;
    for c in s.chars() {
        if is_break(c) {
            out.push(c);
            breaks = true;
        } else {
            if breaks {
                out.push_str(&" ".repeat(ROOT_INDENT));
            }
            out.push(c);
            breaks = false;
        }
    }
}

/// Whether a YAML 1.2 core-schema reader (the one serde's YAML readers follow) takes
/// the plain scalar `s` for a null, a boolean, an integer or a float, or for a number
/// with leading zeros that the schema leaves undefined.
fn reads_as_non_string(s: &str) -> bool {
    matches!(
        s,
        "" | "~"
            | "null"
            | "Null"
            | "NULL"
            | "true"
            | "True"
            | "TRUE"
            | "false"
            | "False"
            | "FALSE"
    ) || is_int(s)
        || leading_zero_digits(s)
        || is_float(s)
}

/// Digits after a leading zero (`0755`, `-01`): not an integer in YAML 1.2.
fn leading_zero_digits(s: &str) -> bool {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    digits.len() > 1 && digits.starts_with('0') && digits[1..].bytes().all(|b| b.is_ascii_digit())
}

/// A 128-bit integer: decimal, or `0x`/`0o`/`0b` with an optional sign.
fn is_int(s: &str) -> bool {
    let radix_digits = |rest: &str, radix| {
        !rest.starts_with(['+', '-']) && u128::from_str_radix(rest, radix).is_ok()
    };
    let unsigned = s.strip_prefix('+').unwrap_or(s);
    let negative = s.strip_prefix('-');
    for (prefix, radix) in [("0x", 16), ("0o", 8), ("0b", 2)] {
        if unsigned
            .strip_prefix(prefix)
            .is_some_and(|rest| radix_digits(rest, radix))
        {
            return true;
        }
        if negative
            .and_then(|n| n.strip_prefix(prefix))
            .is_some_and(|rest| i128::from_str_radix(&format!("-{rest}"), radix).is_ok())
        {
            return true;
        }
    }
    if leading_zero_digits(s) {
        return false;
    }
    (!unsigned.starts_with(['+', '-']) && unsigned.parse::<u128>().is_ok())
        || s.parse::<i128>().is_ok()
}

/// A finite float as Rust reads it, or YAML's `.inf`/`-.inf`/`.nan` spellings.
fn is_float(s: &str) -> bool {
    if leading_zero_digits(s) {
        return false;
    }
    let unsigned = match s.strip_prefix('+') {
        Some(rest) if rest.starts_with(['+', '-']) => return false,
        Some(rest) => rest,
        None => s,
    };
    matches!(unsigned, ".inf" | ".Inf" | ".INF")
        || matches!(s, "-.inf" | "-.Inf" | "-.INF" | ".nan" | ".NaN" | ".NAN")
        || unsigned.parse::<f64>().is_ok_and(f64::is_finite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_follow_libyaml() {
        for (s, printed) in [
            ("linux", "linux\n"),
            ("a: b", "'a: b'\n"),
            ("#x", "'#x'\n"),
            ("it's", "it's\n"),
            ("'q", "'''q'\n"),
            ("true", "'true'\n"),
            ("0755", "'0755'\n"),
            ("1.5", "'1.5'\n"),
            ("a\tb", "\"a\\tb\"\n"),
            ("é😀", "é😀\n"),
            ("\u{1}", "\"\\x01\"\n"),
            (" lead", "' lead'\n"),
            ("a\nb", "|-\n  a\n  b\n"),
            ("a\nb\n", "|\n  a\n  b\n"),
            ("a\n\n", "|+\n  a\n\n"),
            (" a\nb", "|2-\n   a\n  b\n"),
            ("a \nb", "\"a \\nb\"\n"),
        ] {
            assert_eq!(document(s), printed, "{s:?}");
        }
    }
}
