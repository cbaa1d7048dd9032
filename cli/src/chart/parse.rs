//! Builds the template tree (text, output actions, `if`, `range`, `define`) from lexed items.
//!
//! Only the subset of Go's `text/template` that the chart uses is accepted; anything else
//! is a syntax error naming the template and line, never silently ignored.

use std::collections::BTreeMap;

use super::lex::{Item, Token};
use super::TemplateError;

/// One operand of a command.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Operand {
    /// Field path from the dot.
    Field(Vec<String>),
    /// Variable with an optional field path (`$` is the root).
    Variable(String, Vec<String>),
    /// Function name.
    Func(String),
    /// Literal value.
    Literal(serde_json::Value),
    /// Parenthesized pipeline.
    Sub(Pipeline),
}

/// `op op op` — a function call when the first operand is a function, else one value.
pub(crate) type Command = Vec<Operand>;

/// `cmd | cmd | cmd`, optionally declaring variables (`$x :=`, `$i, $v :=`).
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Pipeline {
    /// Variables declared by this pipeline.
    pub(crate) decl: Vec<String>,
    /// The commands; each one's result is passed as the last argument of the next.
    pub(crate) cmds: Vec<Command>,
    /// Source line, for errors.
    pub(crate) line: usize,
}

/// A node of the template tree.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    /// Literal text.
    Text(String),
    /// `{{ pipeline }}`: printed unless it only declares a variable.
    Action(Pipeline),
    /// `if` / `else if` / `else`.
    If {
        branches: Vec<(Pipeline, Vec<Node>)>,
        otherwise: Vec<Node>,
    },
    /// `range` over a list or map, with an optional `else` for an empty collection.
    Range {
        pipe: Pipeline,
        body: Vec<Node>,
        otherwise: Vec<Node>,
    },
}

/// A parsed template file: its body plus the named templates it defines.
#[derive(Debug, Clone, Default)]
pub(crate) struct Parsed {
    pub(crate) body: Vec<Node>,
    pub(crate) defines: BTreeMap<String, Vec<Node>>,
}

/// What ended a list of nodes.
enum Stop {
    Eof,
    End,
    Else(Option<Pipeline>),
}

struct Parser<'a> {
    name: &'a str,
    items: Vec<Item>,
    pos: usize,
    defines: BTreeMap<String, Vec<Node>>,
}

/// Parses a lexed template.
pub(crate) fn parse(name: &str, items: Vec<Item>) -> Result<Parsed, TemplateError> {
    let mut p = Parser {
        name,
        items,
        pos: 0,
        defines: BTreeMap::new(),
    };
    let (body, stop) = p.list(0)?;
    match stop {
        Stop::Eof => Ok(Parsed {
            body,
            defines: p.defines,
        }),
        Stop::End | Stop::Else(_) => Err(p.err(p.line(), "unexpected {{ end }} or {{ else }}")),
    }
}

impl Parser<'_> {
    fn err(&self, line: usize, message: &str) -> TemplateError {
        TemplateError::Syntax {
            template: self.name.to_string(),
            line,
            message: message.to_string(),
        }
    }

    fn line(&self) -> usize {
        match self.items.get(self.pos.saturating_sub(1)) {
            Some(Item::Action { line, .. }) => *line,
            _ => 0,
        }
    }

    /// Parses nodes until EOF, `end` or `else`.
    fn list(&mut self, depth: usize) -> Result<(Vec<Node>, Stop), TemplateError> {
        let mut nodes = Vec::new();
        while self.pos < self.items.len() {
            let item = self.items[self.pos].clone();
            self.pos += 1;
            match item {
                Item::Text(t) => nodes.push(Node::Text(t)),
                Item::Action { tokens, line } => {
                    let keyword = match tokens.first() {
                        Some(Token::Ident(k)) => k.as_str(),
                        _ => "",
                    };
                    match keyword {
                        "end" if tokens.len() == 1 => return Ok((nodes, Stop::End)),
                        "else" => {
                            let rest = &tokens[1..];
                            if rest.is_empty() {
                                return Ok((nodes, Stop::Else(None)));
                            }
                            if rest.first() != Some(&Token::Ident("if".into())) {
                                return Err(self.err(line, "only 'else' and 'else if' are supported"));
                            }
                            let pipe = self.pipeline(&rest[1..], line)?;
                            return Ok((nodes, Stop::Else(Some(pipe))));
                        }
                        "if" => nodes.push(self.if_node(&tokens[1..], line, depth)?),
                        "range" => {
                            let pipe = self.pipeline(&tokens[1..], line)?;
                            let (body, stop) = self.list(depth + 1)?;
                            let otherwise = match stop {
                                Stop::End => Vec::new(),
                                Stop::Else(None) => self.expect_end(depth, line)?,
                                Stop::Else(Some(_)) => {
                                    return Err(self.err(line, "'else if' inside range"))
                                }
                                Stop::Eof => return Err(self.err(line, "range without end")),
                            };
                            nodes.push(Node::Range {
                                pipe,
                                body,
                                otherwise,
                            });
                        }
                        "define" => {
                            if depth != 0 {
                                return Err(self.err(line, "define must be at top level"));
                            }
                            let Some(Token::Str(tname)) = tokens.get(1) else {
                                return Err(self.err(line, "define needs a quoted name"));
                            };
                            let tname = tname.clone();
                            let body = self.expect_end(depth + 1, line)?;
                            self.defines.insert(tname, body);
                        }
                        "with" | "template" | "block" | "break" | "continue" => {
                            return Err(self.err(
                                line,
                                &format!("'{keyword}' is not supported by this renderer; use if/range/include"),
                            ))
                        }
                        _ => nodes.push(Node::Action(self.pipeline(&tokens, line)?)),
                    }
                }
            }
        }
        Ok((nodes, Stop::Eof))
    }

    fn expect_end(&mut self, depth: usize, line: usize) -> Result<Vec<Node>, TemplateError> {
        match self.list(depth)? {
            (nodes, Stop::End) => Ok(nodes),
            _ => Err(self.err(line, "missing {{ end }}")),
        }
    }

    fn if_node(
        &mut self,
        cond: &[Token],
        line: usize,
        depth: usize,
    ) -> Result<Node, TemplateError> {
        let mut branches = Vec::new();
        let mut pipe = self.pipeline(cond, line)?;
        loop {
            let (body, stop) = self.list(depth + 1)?;
            branches.push((pipe, body));
            match stop {
                Stop::End => {
                    return Ok(Node::If {
                        branches,
                        otherwise: Vec::new(),
                    })
                }
                Stop::Else(None) => {
                    let otherwise = self.expect_end(depth + 1, line)?;
                    return Ok(Node::If {
                        branches,
                        otherwise,
                    });
                }
                Stop::Else(Some(next)) => pipe = next,
                Stop::Eof => return Err(self.err(line, "if without end")),
            }
        }
    }

    fn pipeline(&self, tokens: &[Token], line: usize) -> Result<Pipeline, TemplateError> {
        let mut decl = Vec::new();
        let mut toks = tokens;
        if let Some(pos) = toks.iter().position(|t| *t == Token::Declare) {
            for (i, t) in toks[..pos].iter().enumerate() {
                match t {
                    Token::Variable(v, path) if path.is_empty() && i % 2 == 0 => {
                        decl.push(v.clone())
                    }
                    Token::Comma if i % 2 == 1 => {}
                    _ => return Err(self.err(line, "bad variable declaration")),
                }
            }
            if decl.is_empty() || decl.len() > 2 {
                return Err(self.err(line, "declare one or two variables"));
            }
            toks = &toks[pos + 1..];
        }
        let mut pos = 0;
        let pipe = self.pipe_until(toks, &mut pos, line, false)?;
        if pos != toks.len() {
            return Err(self.err(line, "unexpected ')'"));
        }
        if pipe.is_empty() {
            return Err(self.err(line, "empty action"));
        }
        Ok(Pipeline {
            decl,
            cmds: pipe,
            line,
        })
    }

    fn pipe_until(
        &self,
        toks: &[Token],
        pos: &mut usize,
        line: usize,
        in_paren: bool,
    ) -> Result<Vec<Command>, TemplateError> {
        let mut cmds = Vec::new();
        let mut cur: Command = Vec::new();
        while *pos < toks.len() {
            let t = &toks[*pos];
            *pos += 1;
            match t {
                Token::Pipe => {
                    if cur.is_empty() {
                        return Err(self.err(line, "empty command before '|'"));
                    }
                    cmds.push(std::mem::take(&mut cur));
                }
                Token::RParen => {
                    if !in_paren {
                        return Err(self.err(line, "unmatched ')'"));
                    }
                    if !cur.is_empty() {
                        cmds.push(cur);
                    }
                    return Ok(cmds);
                }
                Token::LParen => {
                    let sub = self.pipe_until(toks, pos, line, true)?;
                    if sub.is_empty() {
                        return Err(self.err(line, "empty parentheses"));
                    }
                    cur.push(Operand::Sub(Pipeline {
                        decl: Vec::new(),
                        cmds: sub,
                        line,
                    }));
                }
                Token::Field(p) => cur.push(Operand::Field(p.clone())),
                Token::Variable(v, p) => cur.push(Operand::Variable(v.clone(), p.clone())),
                Token::Ident(f) => cur.push(Operand::Func(f.clone())),
                Token::Str(s) => cur.push(Operand::Literal(serde_json::Value::String(s.clone()))),
                Token::Int(n) => cur.push(Operand::Literal(serde_json::Value::from(*n))),
                Token::Bool(b) => cur.push(Operand::Literal(serde_json::Value::Bool(*b))),
                Token::Nil => cur.push(Operand::Literal(serde_json::Value::Null)),
                Token::Declare | Token::Comma => {
                    return Err(self.err(line, "unexpected ':=' or ','"))
                }
            }
        }
        if in_paren {
            return Err(self.err(line, "missing ')'"));
        }
        if !cur.is_empty() {
            cmds.push(cur);
        }
        Ok(cmds)
    }
}

#[cfg(test)]
mod tests {
    use super::super::lex::lex;
    use super::*;

    fn p(src: &str) -> Result<Parsed, TemplateError> {
        parse("t", lex("t", src)?)
    }

    #[test]
    fn if_else_if_else_builds_three_branches() {
        let parsed = p("{{ if .A }}a{{ else if .B }}b{{ else }}c{{ end }}").unwrap();
        match &parsed.body[0] {
            Node::If {
                branches,
                otherwise,
            } => {
                assert_eq!(branches.len(), 2);
                assert_eq!(otherwise, &vec![Node::Text("c".into())]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn define_is_collected_not_emitted() {
        let parsed = p(r#"{{ define "x" }}hi{{ end }}body"#).unwrap();
        assert_eq!(parsed.body, vec![Node::Text("body".into())]);
        assert!(parsed.defines.contains_key("x"));
    }

    #[test]
    fn missing_end_is_an_error() {
        assert!(p("{{ if .A }}a").is_err());
        assert!(p("{{ end }}").is_err());
        assert!(p("{{ (eq .A 1 }}").is_err());
    }

    #[test]
    fn unsupported_keywords_are_refused() {
        let err = p("{{ with .A }}x{{ end }}").unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");
    }
}
