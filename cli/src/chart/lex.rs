//! Splits a Go-template source into text and action items, and an action into tokens.
//!
//! Kept apart from the parser so that whitespace trimming (`{{-` / `-}}`) and comments are
//! settled before any structure is built, exactly as Go's `text/template` lexer does.

use super::TemplateError;

/// One piece of a template source.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Item {
    /// Literal text, already trimmed by neighbouring `{{-` / `-}}` markers.
    Text(String),
    /// The tokens inside one `{{ ... }}` (comments produce no item), with its line.
    Action { tokens: Vec<Token>, line: usize },
}

/// A token inside an action.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Token {
    /// `.` or `.A.b.c`: a field path from the current dot (empty path is the dot itself).
    Field(Vec<String>),
    /// `$` or `$name` optionally followed by `.a.b`.
    Variable(String, Vec<String>),
    /// A function name or keyword (`if`, `range`, `eq`, ...).
    Ident(String),
    /// A string literal (double-quoted or back-quoted).
    Str(String),
    /// An integer literal.
    Int(i64),
    /// `true` / `false`.
    Bool(bool),
    /// `nil`.
    Nil,
    /// `(`.
    LParen,
    /// `)`.
    RParen,
    /// `|`.
    Pipe,
    /// `:=`.
    Declare,
    /// `,` (between range variables).
    Comma,
}

/// Splits `src` into items. `name` is used in error messages.
pub(crate) fn lex(name: &str, src: &str) -> Result<Vec<Item>, TemplateError> {
    let mut items = Vec::new();
    let mut rest = src;
    let mut line = 1usize;
    let mut trim_next_text = false;
    while !rest.is_empty() {
        let (text, after) = match rest.find("{{") {
            Some(i) => (&rest[..i], Some(&rest[i + 2..])),
            None => (rest, None),
        };
        let mut text = text.to_string();
        line += text.matches('\n').count();
        if trim_next_text {
            text = text.trim_start().to_string();
        }
        let Some(after) = after else {
            push_text(&mut items, text);
            break;
        };
        let trim_left =
            after.starts_with("- ") || after.starts_with("-\n") || after.starts_with("-\t");
        if trim_left {
            text = text.trim_end().to_string();
        }
        push_text(&mut items, text);
        let body_start = if trim_left { &after[1..] } else { after };
        let close = find_close(body_start).ok_or_else(|| TemplateError::Syntax {
            template: name.to_string(),
            line,
            message: "unclosed action: missing '}}'".to_string(),
        })?;
        let mut body = &body_start[..close];
        rest = &body_start[close + 2..];
        trim_next_text = false;
        if body.ends_with(" -") || body.ends_with("\n-") || body.ends_with("\t-") {
            body = &body[..body.len() - 1];
            trim_next_text = true;
        }
        let action_line = line;
        line += body.matches('\n').count();
        let trimmed = body.trim();
        if trimmed.starts_with("/*") {
            if !trimmed.ends_with("*/") {
                return Err(TemplateError::Syntax {
                    template: name.to_string(),
                    line: action_line,
                    message: "comment must end with '*/' right before '}}'".to_string(),
                });
            }
            continue;
        }
        let tokens = tokenize(trimmed).map_err(|message| TemplateError::Syntax {
            template: name.to_string(),
            line: action_line,
            message,
        })?;
        items.push(Item::Action {
            tokens,
            line: action_line,
        });
    }
    Ok(items)
}

fn push_text(items: &mut Vec<Item>, text: String) {
    if !text.is_empty() {
        items.push(Item::Text(text));
    }
}

/// Finds the `}}` closing an action, skipping string literals and comments.
fn find_close(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i + 1 < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'`' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'`' {
                    i += 1;
                }
            }
            b'/' if bytes[i + 1] == b'*' => {
                let end = s[i + 2..].find("*/")?;
                i += 2 + end + 1;
            }
            b'}' if bytes[i + 1] == b'}' => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Reads `.a.b.c` path segments starting at a '.'; returns the segments and bytes consumed.
fn read_path(s: &str) -> Result<(Vec<String>, usize), String> {
    let mut segs = Vec::new();
    let mut i = 0;
    let b = s.as_bytes();
    while i < b.len() && b[i] == b'.' {
        let start = i + 1;
        let mut j = start;
        while j < b.len() && is_ident_char(b[j] as char) {
            j += 1;
        }
        if j == start {
            if segs.is_empty() && i == 0 {
                // A lone '.' is the dot itself.
                return Ok((segs, 1));
            }
            return Err(format!("empty field name in '{s}'"));
        }
        segs.push(s[start..j].to_string());
        i = j;
    }
    Ok((segs, i))
}

/// Tokenizes the inside of one action.
pub(crate) fn tokenize(s: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    let b = s.as_bytes();
    while i < b.len() {
        let c = b[i] as char;
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '(' => {
                out.push(Token::LParen);
                i += 1;
            }
            ')' => {
                out.push(Token::RParen);
                i += 1;
            }
            '|' => {
                out.push(Token::Pipe);
                i += 1;
            }
            ',' => {
                out.push(Token::Comma);
                i += 1;
            }
            ':' if b.get(i + 1) == Some(&b'=') => {
                out.push(Token::Declare);
                i += 2;
            }
            '.' => {
                let (segs, n) = read_path(&s[i..])?;
                out.push(Token::Field(segs));
                i += n;
            }
            '$' => {
                let mut j = i + 1;
                while j < b.len() && is_ident_char(b[j] as char) {
                    j += 1;
                }
                let name = s[i + 1..j].to_string();
                let (segs, n) = if j < b.len() && b[j] == b'.' {
                    read_path(&s[j..])?
                } else {
                    (Vec::new(), 0)
                };
                out.push(Token::Variable(name, segs));
                i = j + n;
            }
            '"' => {
                let mut v = String::new();
                let mut j = i + 1;
                loop {
                    let Some(&ch) = b.get(j) else {
                        return Err("unterminated string literal".to_string());
                    };
                    match ch {
                        b'"' => break,
                        b'\\' => {
                            let esc = b.get(j + 1).copied().ok_or("unterminated escape")?;
                            v.push(match esc {
                                b'n' => '\n',
                                b't' => '\t',
                                b'"' => '"',
                                b'\\' => '\\',
                                other => {
                                    return Err(format!("unsupported escape '\\{}'", other as char))
                                }
                            });
                            j += 2;
                        }
                        _ => {
                            // Copy one UTF-8 character.
                            let ch_len = s[j..].chars().next().map_or(1, char::len_utf8);
                            v.push_str(&s[j..j + ch_len]);
                            j += ch_len;
                        }
                    }
                }
                out.push(Token::Str(v));
                i = j + 1;
            }
            '`' => {
                let end = s[i + 1..].find('`').ok_or("unterminated raw string")?;
                out.push(Token::Str(s[i + 1..i + 1 + end].to_string()));
                i += end + 2;
            }
            c if c.is_ascii_digit()
                || (c == '-' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) =>
            {
                let mut j = i + 1;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                let n: i64 = s[i..j]
                    .parse()
                    .map_err(|_| format!("bad number '{}'", &s[i..j]))?;
                out.push(Token::Int(n));
                i = j;
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut j = i;
                while j < b.len() && is_ident_char(b[j] as char) {
                    j += 1;
                }
                let word = &s[i..j];
                out.push(match word {
                    "true" => Token::Bool(true),
                    "false" => Token::Bool(false),
                    "nil" => Token::Nil,
                    _ => Token::Ident(word.to_string()),
                });
                i = j;
            }
            other => return Err(format!("unexpected character '{other}'")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_markers_remove_surrounding_whitespace() {
        let items = lex("t", "a  \n  {{- .X -}}  \n b").unwrap();
        assert_eq!(items[0], Item::Text("a".into()));
        assert_eq!(items[2], Item::Text("b".into()));
    }

    #[test]
    fn comments_produce_no_item() {
        let items = lex("t", "x{{/* hi }} */}}y").unwrap();
        assert_eq!(items, vec![Item::Text("x".into()), Item::Text("y".into())]);
    }

    #[test]
    fn tokens_cover_fields_variables_and_literals() {
        let t = tokenize(r#"$x := eq .Values.a "s\"q" 3 | quote"#).unwrap();
        assert_eq!(
            t,
            vec![
                Token::Variable("x".into(), vec![]),
                Token::Declare,
                Token::Ident("eq".into()),
                Token::Field(vec!["Values".into(), "a".into()]),
                Token::Str("s\"q".into()),
                Token::Int(3),
                Token::Pipe,
                Token::Ident("quote".into()),
            ]
        );
    }

    #[test]
    fn unclosed_action_names_the_line() {
        let err = lex("file.yaml", "a\nb\n{{ .X").unwrap_err();
        assert!(err.to_string().contains("file.yaml:3"), "{err}");
    }
}
