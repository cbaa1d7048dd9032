//! `toYaml` printed the way Helm prints it.
//!
//! Helm's `toYaml` is `sigs.k8s.io/yaml`: the value goes through JSON and is printed by
//! go-yaml v2, which reads plain scalars by YAML 1.1 rules. A string that YAML 1.1 would
//! read as something else (`yes`, `no`, `on`, `off`, `y`, `n`, `~`, `null`, `2024-01-01`,
//! `0755`, `1e3`, `1:20`) is therefore double-quoted, so it comes back as the same string
//! from any reader, Kubernetes' included; a YAML 1.2 emitter would print `yes` and
//! `2024-01-01` bare. Map keys are sorted like go-yaml v2 sorts them (digit runs by
//! value). The resolution rules below restate go-yaml v2's `resolve.go` (resolveMap,
//! `parseTimestamp`, `strconv.ParseInt(s, 0, 64)`, the float pattern and
//! `isBase60Float`); strings that need no quoting for that reason are printed the way
//! libyaml's emitter prints them ([`super::libyaml`]), the emitter go-yaml v2 is a port
//! of (plain, or single-quoted when an indicator character requires it, literal block
//! when multi-line).

use std::cmp::Ordering;

use serde_json::Value;

/// `toYaml` of `v`, without the final newline (Helm trims one).
pub(crate) fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    block(v, 0, &mut out);
    out.strip_suffix('\n').unwrap_or(&out).to_string()
}

/// `v` as a block at column `indent`, each line ending in a newline.
fn block(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_by(|a, b| go_key_order(a.0, b.0));
            for (k, val) in entries {
                out.push_str(&pad);
                out.push_str(&key(k));
                out.push(':');
                match val {
                    Value::Object(o) if !o.is_empty() => {
                        out.push('\n');
                        block(val, indent + 2, out);
                    }
                    // go-yaml v2 (like libyaml) does not indent a sequence under its key.
                    Value::Array(a) if !a.is_empty() => {
                        out.push('\n');
                        block(val, indent, out);
                    }
                    _ => {
                        out.push(' ');
                        out.push_str(&scalar(val, indent));
                        out.push('\n');
                    }
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                out.push_str(&pad);
                out.push('-');
                match item {
                    Value::Object(o) if !o.is_empty() => nested_in_item(item, indent, out),
                    Value::Array(a) if !a.is_empty() => nested_in_item(item, indent, out),
                    _ => {
                        out.push(' ');
                        out.push_str(&scalar(item, indent));
                        out.push('\n');
                    }
                }
            }
        }
        _ => {
            out.push_str(&pad);
            out.push_str(&scalar(v, indent));
            out.push('\n');
        }
    }
}

/// A non-empty map or list as a sequence item: its first line follows the `- `.
fn nested_in_item(item: &Value, indent: usize, out: &mut String) {
    let mut inner = String::new();
    block(item, indent + 2, &mut inner);
    out.push(' ');
    out.push_str(&inner[indent + 2..]);
}

/// A map key.
fn key(k: &str) -> String {
    if k.contains('\n') || needs_double_quotes(k) {
        super::eval::go_quote(k)
    } else {
        single_line(k).unwrap_or_else(|| super::eval::go_quote(k))
    }
}

/// A scalar (or empty collection) at a line indented by `indent`.
fn scalar(v: &Value, indent: usize) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Object(_) => "{}".to_string(),
        Value::Array(_) => "[]".to_string(),
        Value::String(s) if s.contains('\n') => {
            // A literal block: continuation lines go below the current indentation.
            let text = super::libyaml::document(s);
            let pad = " ".repeat(indent);
            text.strip_suffix('\n')
                .unwrap_or(&text)
                .split('\n')
                .enumerate()
                .map(|(i, l)| {
                    if i == 0 || l.is_empty() {
                        l.to_string()
                    } else {
                        format!("{pad}{l}")
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        Value::String(s) if needs_double_quotes(s) => super::eval::go_quote(s),
        Value::String(s) => match single_line(s) {
            Some(text) => text,
            None => super::eval::go_quote(s),
        },
    }
}

/// libyaml's one-line form of `s`: plain, single- or double-quoted.
fn single_line(s: &str) -> Option<String> {
    let text = super::libyaml::document(s);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    (!text.contains('\n')).then(|| text.to_string())
}

/// Whether go-yaml v2 would double-quote `s`: read plain, it would not be this string.
pub(crate) fn needs_double_quotes(s: &str) -> bool {
    resolves_to_non_string(s) || is_base60_float(s)
}

/// go-yaml v2's `resolve` for an untagged plain scalar: anything but a string?
fn resolves_to_non_string(s: &str) -> bool {
    const SPECIAL: &[&str] = &[
        "y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON", "n", "N", "no",
        "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF", "", "~", "null", "Null",
        "NULL", ".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf",
        "-.Inf", "-.INF", "<<",
    ];
    if SPECIAL.contains(&s) {
        return true;
    }
    match s.as_bytes().first() {
        Some(b'.') => go_parse_float(s),
        Some(b'0'..=b'9' | b'+' | b'-') => {
            if is_timestamp(s) {
                return true;
            }
            let plain = s.replace('_', "");
            go_parse_int(&plain)
                || (is_yaml_style_float(&plain) && go_parse_float(&plain))
                || plain
                    .strip_prefix("0b")
                    .or_else(|| plain.strip_prefix("-0b"))
                    .is_some_and(|bits| i64::from_str_radix(bits, 2).is_ok())
        }
        _ => false,
    }
}

/// `strconv.ParseInt(s, 0, 64)` or `strconv.ParseUint(s, 0, 64)` succeeds.
fn go_parse_int(s: &str) -> bool {
    let (negative, body) = match s.as_bytes().first() {
        Some(b'+') => (false, &s[1..]),
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d)
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d)
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, lower.as_str())
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return false;
    }
    match u128::from_str_radix(digits, radix) {
        Ok(v) if negative => v <= 1u128 << 63,
        Ok(v) => v <= u128::from(u64::MAX),
        Err(_) => false,
    }
}

/// `strconv.ParseFloat(s, 64)` succeeds (for the decimal forms YAML can reach here).
fn go_parse_float(s: &str) -> bool {
    let t = s.trim_start_matches(['+', '-']);
    if t.len() + 1 < s.len() {
        return false;
    }
    let lower = t.to_ascii_lowercase();
    if matches!(lower.as_str(), "inf" | "infinity" | "nan") {
        return true;
    }
    is_yaml_style_float(t)
}

/// `^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`.
fn is_yaml_style_float(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some(("", frac)) => digits(frac),
        Some((int, frac)) => digits(int) && (frac.is_empty() || digits(frac)),
        None => digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)));
    mantissa_ok && exponent_ok
}

/// `^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$` (go-yaml v2's `isBase60Float`).
fn is_base60_float(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (main, frac) = match s.split_once('.') {
        Some((m, f)) => (m, Some(f)),
        None => (s, None),
    };
    if frac.is_some_and(|f| !f.bytes().all(|b| b.is_ascii_digit() || b == b'_')) {
        return false;
    }
    let mut parts = main.split(':');
    let first = parts.next().unwrap_or_default();
    let first_ok = first.as_bytes().first().is_some_and(u8::is_ascii_digit)
        && first.bytes().all(|b| b.is_ascii_digit() || b == b'_');
    let rest: Vec<&str> = parts.collect();
    first_ok
        && !rest.is_empty()
        && rest.iter().all(|p| match p.as_bytes() {
            [d] => d.is_ascii_digit(),
            [a, b] => (b'0'..=b'5').contains(a) && b.is_ascii_digit(),
            _ => false,
        })
}

/// A YAML 1.1 timestamp as go-yaml v2 accepts it: `YYYY-M-D`, optionally followed by
/// `T`, `t` or a space and a time `h:m:s` (fraction and zone allowed).
fn is_timestamp(s: &str) -> bool {
    let (date, time) = match s.find(['T', 't', ' ']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut fields = date.split('-');
    let (Some(y), Some(m), Some(d), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    let num = |t: &str, min: usize, max: usize| {
        (min..=max).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit())
    };
    if !(num(y, 4, 4) && num(m, 1, 2) && num(d, 1, 2)) {
        return false;
    }
    let (Ok(year), Ok(month), Ok(day)) = (y.parse::<u32>(), m.parse::<u32>(), d.parse::<u32>())
    else {
        return false;
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if !(1..=days).contains(&day) {
        return false;
    }
    match time {
        None => true,
        Some(t) => {
            let clock = t
                .split(['Z', 'z', '+', '-', '.'])
                .next()
                .unwrap_or_default();
            let parts: Vec<&str> = clock.split(':').collect();
            parts.len() == 3 && parts.iter().all(|p| num(p, 1, 2))
        }
    }
}

/// go-yaml v2's map key order (`keyList.Less` in sorter.go): letters compare as runes,
/// a letter sorts after a non-letter, and runs of digits compare by value.
fn go_key_order(a: &str, b: &str) -> Ordering {
    let (ar, br): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    for i in 0..ar.len().min(br.len()) {
        if ar[i] == br[i] {
            continue;
        }
        let (al, bl) = (ar[i].is_alphabetic(), br[i].is_alphabetic());
        if al && bl {
            return ar[i].cmp(&br[i]);
        }
        if al || bl {
            return if bl {
                Ordering::Less
            } else {
                Ordering::Greater
            };
        }
        let (mut an, mut bn) = (0u128, 0u128);
        if ar[i] == '0' || br[i] == '0' {
            // Inside a number with a non-zero digit before: compare as digits, not values.
            if ar[..i]
                .iter()
                .rev()
                .take_while(|c| c.is_ascii_digit())
                .any(|c| *c != '0')
            {
                an = 1;
                bn = 1;
            }
        }
        let run = |r: &[char], mut n: u128| {
            let mut end = i;
            while end < r.len() && r[end].is_ascii_digit() {
                n = n
                    .saturating_mul(10)
                    .saturating_add(u128::from(r[end] as u8 - b'0'));
                end += 1;
            }
            (n, end)
        };
        let (an, ai) = run(&ar, an);
        let (bn, bi) = run(&br, bn);
        if an != bn {
            return an.cmp(&bn);
        }
        if ai != bi {
            return ai.cmp(&bi);
        }
        return ar[i].cmp(&br[i]);
    }
    ar.len().cmp(&br.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What Helm's `toYaml` prints for these strings (checked against go-yaml v2's rules):
    /// YAML 1.1 booleans, nulls, dates and numbers-as-strings come back quoted.
    #[test]
    fn yaml_1_1_look_alikes_are_double_quoted_like_helm() {
        for s in [
            "yes",
            "no",
            "on",
            "off",
            "y",
            "n",
            "Y",
            "N",
            "Yes",
            "OFF",
            "~",
            "null",
            "Null",
            "",
            "true",
            "False",
            "2024-01-01",
            "2024-1-2",
            "2001-12-14t21:59:43.10-05:00",
            "2001-12-14 21:59:43.10",
            "1",
            "0755",
            "0x1F",
            "1_000",
            "1e3",
            "-1.5",
            ".5",
            "+12",
            "1:20",
            "190:20:30",
            ".inf",
            "-.Inf",
            ".NaN",
            "<<",
            "0b101",
        ] {
            let v = json!({ "k": s });
            assert_eq!(
                to_yaml(&v),
                format!("k: {}", super::super::eval::go_quote(s)),
                "{s:?}"
            );
            // And it reads back as the same string.
            let back: Value = clustermesh_api::yaml::from_str(&to_yaml(&v)).unwrap();
            assert_eq!(back, v, "{s:?}");
        }
    }

    #[test]
    fn ordinary_strings_stay_plain_or_single_quoted() {
        for (s, printed) in [
            ("linux", "linux"),
            ("yesterday", "yesterday"),
            ("2024-13-01", "2024-13-01"),
            ("2024-02-30", "2024-02-30"),
            ("1.2.3", "1.2.3"),
            ("v1", "v1"),
            ("10.0.0.1", "10.0.0.1"),
            ("a: b", "'a: b'"),
            ("#x", "'#x'"),
            ("Exists", "Exists"),
        ] {
            assert_eq!(to_yaml(&json!({ "k": s })), format!("k: {printed}"));
        }
    }

    #[test]
    fn nested_maps_and_lists_are_printed_in_block_style() {
        let v = json!({
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "tolerations": [{"operator": "Exists"}, {"key": "on", "effect": "NoSchedule"}],
            "empty": {}, "none": [], "n": 3, "b": true, "z": null,
            "lists": [[1, 2], "x"],
            "text": "a\nb",
        });
        assert_eq!(
            to_yaml(&v),
            "b: true\nempty: {}\nlists:\n- - 1\n  - 2\n- x\n\"n\": 3\nnone: []\n\
             requests:\n  cpu: 100m\n  memory: 128Mi\ntext: |-\n  a\n  b\n\
             tolerations:\n- operator: Exists\n- effect: NoSchedule\n  key: \"on\"\nz: null"
        );
        let back: Value = clustermesh_api::yaml::from_str(&to_yaml(&v)).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn keys_sort_like_go_yaml_and_look_alike_keys_are_quoted() {
        let v = json!({"a10": 1, "a9": 2, "a_": 3, "b": 4, "yes": 5});
        assert_eq!(to_yaml(&v), "a_: 3\na9: 2\na10: 1\nb: 4\n\"yes\": 5");
    }

    proptest::proptest! {
        /// Whatever the string, what toYaml prints reads back as that string (followed by
        /// the newline a template puts after it: like Helm's, the output has one final
        /// newline trimmed, which a keep-chomped literal at the very end needs).
        #[test]
        fn any_string_round_trips(s in "[ -~\\n]{0,24}") {
            let v = json!({"k": s, "l": [s.clone()]});
            let text = to_yaml(&v);
            let back: Value = clustermesh_api::yaml::from_str(&format!("{text}\n")).unwrap();
            proptest::prop_assert_eq!(back, v, "{}", text);
        }
    }
}
