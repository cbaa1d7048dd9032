//! The text form of a label selector, as `kubectl get -l` and `labels.Parse` in
//! `k8s.io/apimachinery` write it: `app=web,tier!=db,env in (prod,staging),!canary,team`.
//!
//! Used where a selector comes from a command-line flag or a Helm value rather than a
//! Kubernetes object. The text is turned into a [`WireLabelSelector`] and validated by
//! [`LabelSelector::from_wire`], so keys and values follow the same rules as in objects.

use std::fmt;

use super::{LabelSelector, SelectorError, WireLabelSelector, WireRequirement};

/// Why a selector text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorTextError {
    /// The text does not follow the grammar.
    #[error("label selector {text:?}: {problem}")]
    Syntax {
        /// The whole text.
        text: String,
        /// What is wrong, naming the offending term.
        problem: String,
    },
    /// The text parses but a key or value is invalid.
    #[error("label selector {text:?}")]
    Invalid {
        /// The whole text.
        text: String,
        /// The rule broken.
        #[source]
        source: SelectorError,
    },
}

/// Parses a selector in `kubectl -l` syntax. The empty text selects everything.
///
/// Terms, separated by commas (commas inside `( )` belong to a set):
/// `key=value` or `key==value` (equal), `key!=value` (absent or different),
/// `key in (a,b)`, `key notin (a,b)`, `key` (present), `!key` (absent).
///
/// # Errors
/// [`SelectorTextError`] naming the first term that does not parse or validate.
pub fn parse_selector_text(text: &str) -> Result<LabelSelector, SelectorTextError> {
    let syntax = |problem: String| SelectorTextError::Syntax {
        text: text.to_owned(),
        problem,
    };
    let mut wire = WireLabelSelector::default();
    if text.trim().is_empty() {
        return Ok(LabelSelector::everything());
    }
    for term in split_terms(text).map_err(&syntax)? {
        let term = term.trim();
        if term.is_empty() {
            return Err(syntax(
                "empty term (two commas in a row, or a trailing comma)".into(),
            ));
        }
        wire.match_expressions
            .push(parse_term(term).map_err(|p| syntax(format!("term {term:?}: {p}")))?);
    }
    LabelSelector::from_wire(&wire).map_err(|source| SelectorTextError::Invalid {
        text: text.to_owned(),
        source,
    })
}

/// Splits at commas outside parentheses.
fn split_terms(text: &str) -> Result<Vec<&str>, String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' if depth == 0 => depth = 1,
            '(' => return Err("nested parentheses".into()),
            ')' if depth == 1 => depth = 0,
            ')' => return Err("')' without '('".into()),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("'(' without ')'".into());
    }
    terms.push(&text[start..]);
    Ok(terms)
}

struct Operator(&'static str);

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

fn requirement(key: &str, operator: Operator, values: Vec<String>) -> WireRequirement {
    WireRequirement {
        key: key.trim().to_owned(),
        operator: operator.to_string(),
        values,
    }
}

fn parse_term(term: &str) -> Result<WireRequirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(requirement(key, Operator("DoesNotExist"), Vec::new()));
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(requirement(
            key,
            Operator("NotIn"),
            vec![value.trim().to_owned()],
        ));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(requirement(
            key,
            Operator("In"),
            vec![value.trim().to_owned()],
        ));
    }
    if let Some(open) = term.find('(') {
        let head = term[..open].trim_end();
        let (key, operator) = head
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| "expected `key in (...)` or `key notin (...)`".to_owned())?;
        let operator = match operator {
            "in" => Operator("In"),
            "notin" => Operator("NotIn"),
            other => return Err(format!("unknown set operator {other:?} (use in or notin)")),
        };
        let rest = &term[open + 1..];
        let Some(inner) = rest.strip_suffix(')') else {
            return Err("text after ')'".into());
        };
        let values = inner.split(',').map(|v| v.trim().to_owned()).collect();
        return Ok(requirement(key, operator, values));
    }
    if term.contains(char::is_whitespace) {
        return Err("a key cannot contain spaces".into());
    }
    Ok(requirement(term, Operator("Exists"), Vec::new()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_operator_parses_and_matches() {
        let s = parse_selector_text(
            "app=web, tier==front,env in (prod, staging),zone notin (z9),team,!canary,ver!=1",
        )
        .unwrap();
        let good = labels(&[
            ("app", "web"),
            ("tier", "front"),
            ("env", "prod"),
            ("team", "a"),
            ("ver", "2"),
        ]);
        assert!(s.matches(&good));
        let mut bad = good.clone();
        bad.insert("canary".into(), "yes".into());
        assert!(!s.matches(&bad));
        let mut bad = good.clone();
        bad.insert("env".into(), "dev".into());
        assert!(!s.matches(&bad));
        let mut bad = good;
        bad.remove("team");
        assert!(!s.matches(&bad));
    }

    #[test]
    fn empty_text_selects_everything() {
        assert!(parse_selector_text("").unwrap().is_everything());
        assert!(parse_selector_text("  ").unwrap().is_everything());
    }

    #[test]
    fn bad_text_is_refused_with_the_term() {
        for bad in [
            "a=b,,c",
            "a=b,",
            "env in (a,b",
            "env in a,b)",
            "env within (a)",
            "env in (a))",
            "a b",
            "env in ((a))",
            "env in (a) x",
            "in (a)",
        ] {
            let err = parse_selector_text(bad).unwrap_err();
            assert!(
                matches!(err, SelectorTextError::Syntax { .. }),
                "{bad}: {err}"
            );
        }
        let err = parse_selector_text("app=we b").unwrap_err();
        assert!(matches!(err, SelectorTextError::Invalid { .. }), "{err}");
        let err = parse_selector_text("a=b,x y").unwrap_err();
        assert!(err.to_string().contains("\"x y\""), "{err}");
    }
}
