//! Evaluates a parsed template against a JSON value, with Go/Helm semantics for truth,
//! printing, field access and the functions the chart uses.
//!
//! Functions: `eq ne lt gt le ge and or not int default quote required fail include
//! toYaml nindent indent until`. Go's rules followed: a pipeline's value is passed as the
//! last argument of the next command; empty values (false, 0, "", nil, empty list/map)
//! are false; `range` over a map visits keys in sorted order.

use std::collections::BTreeMap;

use serde_json::Value;

use super::parse::{Command, Node, Operand, Pipeline};
use super::TemplateError;

/// Maximum `include` nesting, so a template including itself fails instead of recursing.
const MAX_INCLUDE_DEPTH: usize = 32;

/// Evaluation state for one top-level render.
#[derive(Debug)]
pub(crate) struct Evaluator<'a> {
    pub(crate) template: &'a str,
    pub(crate) defines: &'a BTreeMap<String, Vec<Node>>,
    depth: usize,
}

struct Scope<'v> {
    root: &'v Value,
    vars: Vec<(String, Value)>,
}

/// Go's notion of an "empty" value (false in a condition, replaced by `default`).
pub(crate) fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

impl<'a> Evaluator<'a> {
    /// Creates an evaluator for the template named `template`.
    pub(crate) fn new(template: &'a str, defines: &'a BTreeMap<String, Vec<Node>>) -> Self {
        Self {
            template,
            defines,
            depth: 0,
        }
    }

    fn err(&self, line: usize, message: impl Into<String>) -> TemplateError {
        TemplateError::Render {
            template: self.template.to_string(),
            line,
            message: message.into(),
        }
    }

    /// Renders `nodes` with `dot` as both the dot and `$`.
    pub(crate) fn render(&mut self, nodes: &[Node], dot: &Value) -> Result<String, TemplateError> {
        let mut out = String::new();
        let mut scope = Scope {
            root: dot,
            vars: Vec::new(),
        };
        self.nodes(nodes, dot, &mut scope, &mut out)?;
        Ok(out)
    }

    fn nodes(
        &mut self,
        nodes: &[Node],
        dot: &Value,
        scope: &mut Scope<'_>,
        out: &mut String,
    ) -> Result<(), TemplateError> {
        for node in nodes {
            match node {
                Node::Text(t) => out.push_str(t),
                Node::Action(pipe) => {
                    let v = self.pipeline(pipe, dot, scope)?;
                    if pipe.decl.is_empty() {
                        out.push_str(&self.print(&v, pipe.line)?);
                    } else {
                        scope.vars.push((pipe.decl[0].clone(), v));
                    }
                }
                Node::If {
                    branches,
                    otherwise,
                } => {
                    let mark = scope.vars.len();
                    let mut taken = false;
                    for (cond, body) in branches {
                        if truthy(&self.pipeline(cond, dot, scope)?) {
                            self.nodes(body, dot, scope, out)?;
                            taken = true;
                            break;
                        }
                    }
                    if !taken {
                        self.nodes(otherwise, dot, scope, out)?;
                    }
                    scope.vars.truncate(mark);
                }
                Node::Range {
                    pipe,
                    body,
                    otherwise,
                } => {
                    let coll = self.pipeline(pipe, dot, scope)?;
                    let entries: Vec<(Value, Value)> = match &coll {
                        Value::Array(a) => a
                            .iter()
                            .enumerate()
                            .map(|(i, v)| (Value::from(i), v.clone()))
                            .collect(),
                        Value::Object(o) => {
                            let sorted: BTreeMap<_, _> = o.iter().collect();
                            sorted
                                .into_iter()
                                .map(|(k, v)| (Value::String(k.clone()), v.clone()))
                                .collect()
                        }
                        Value::Null => Vec::new(),
                        other => {
                            return Err(self.err(
                                pipe.line,
                                format!("range over {} (need a list or map)", kind(other)),
                            ))
                        }
                    };
                    if entries.is_empty() {
                        self.nodes(otherwise, dot, scope, out)?;
                        continue;
                    }
                    for (key, item) in entries {
                        let mark = scope.vars.len();
                        match pipe.decl.as_slice() {
                            [v] => scope.vars.push((v.clone(), item.clone())),
                            [k, v] => {
                                scope.vars.push((k.clone(), key));
                                scope.vars.push((v.clone(), item.clone()));
                            }
                            _ => {}
                        }
                        self.nodes(body, &item, scope, out)?;
                        scope.vars.truncate(mark);
                    }
                }
            }
        }
        Ok(())
    }

    fn print(&self, v: &Value, line: usize) -> Result<String, TemplateError> {
        Ok(match v {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => number_text(n),
            Value::Array(_) | Value::Object(_) => {
                return Err(self.err(line, format!("cannot print a {}; use toYaml", kind(v))))
            }
        })
    }

    fn pipeline(
        &mut self,
        pipe: &Pipeline,
        dot: &Value,
        scope: &mut Scope<'_>,
    ) -> Result<Value, TemplateError> {
        let mut prev: Option<Value> = None;
        for cmd in &pipe.cmds {
            prev = Some(self.command(cmd, prev, dot, scope, pipe.line)?);
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    fn operand(
        &mut self,
        op: &Operand,
        dot: &Value,
        scope: &mut Scope<'_>,
        line: usize,
    ) -> Result<Value, TemplateError> {
        match op {
            Operand::Field(path) => self.walk(dot, path, line),
            Operand::Variable(name, path) => {
                let base = if name.is_empty() {
                    scope.root.clone()
                } else {
                    scope
                        .vars
                        .iter()
                        .rev()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.clone())
                        .ok_or_else(|| self.err(line, format!("undefined variable ${name}")))?
                };
                self.walk(&base, path, line)
            }
            Operand::Literal(v) => Ok(v.clone()),
            Operand::Sub(p) => self.pipeline(p, dot, scope),
            Operand::Func(f) => self.call(f, Vec::new(), line),
        }
    }

    fn walk(&self, base: &Value, path: &[String], line: usize) -> Result<Value, TemplateError> {
        const NULL: &Value = &Value::Null;
        let mut cur = base;
        for (i, seg) in path.iter().enumerate() {
            match cur {
                Value::Object(o) => cur = o.get(seg).unwrap_or(NULL),
                Value::Null => {
                    return Err(self.err(
                        line,
                        format!(
                            "nil value evaluating .{} (field '{seg}' of a missing value)",
                            path[..i].join(".")
                        ),
                    ))
                }
                other => {
                    return Err(self.err(
                        line,
                        format!("can't read field '{seg}' of a {}", kind(other)),
                    ))
                }
            }
        }
        Ok(cur.clone())
    }

    fn command(
        &mut self,
        cmd: &Command,
        piped: Option<Value>,
        dot: &Value,
        scope: &mut Scope<'_>,
        line: usize,
    ) -> Result<Value, TemplateError> {
        let Some(first) = cmd.first() else {
            return Err(self.err(line, "empty command"));
        };
        match first {
            Operand::Func(name) => {
                let mut args = Vec::with_capacity(cmd.len());
                for op in &cmd[1..] {
                    args.push(self.operand(op, dot, scope, line)?);
                }
                if let Some(p) = piped {
                    args.push(p);
                }
                // `include` needs the name of a template, evaluated like any argument.
                self.call(name, args, line)
            }
            other => {
                if cmd.len() > 1 || piped.is_some() {
                    return Err(
                        self.err(line, "only a function can take arguments or a piped value")
                    );
                }
                self.operand(other, dot, scope, line)
            }
        }
    }

    fn call(&mut self, name: &str, args: Vec<Value>, line: usize) -> Result<Value, TemplateError> {
        let arity = |n: usize| -> Result<(), TemplateError> {
            if args.len() == n {
                Ok(())
            } else {
                Err(self.err(
                    line,
                    format!("{name} takes {n} argument(s), got {}", args.len()),
                ))
            }
        };
        match name {
            "eq" | "ne" => {
                if args.len() < 2 {
                    return Err(self.err(line, format!("{name} needs at least 2 arguments")));
                }
                let any = args[1..].iter().any(|b| values_equal(&args[0], b));
                Ok(Value::Bool(if name == "eq" { any } else { !any }))
            }
            "lt" | "gt" | "le" | "ge" => {
                arity(2)?;
                let a = self.number(&args[0], line)?;
                let b = self.number(&args[1], line)?;
                Ok(Value::Bool(match name {
                    "lt" => a < b,
                    "gt" => a > b,
                    "le" => a <= b,
                    _ => a >= b,
                }))
            }
            "and" => Ok(args
                .iter()
                .find(|v| !truthy(v))
                .or(args.last())
                .cloned()
                .unwrap_or(Value::Null)),
            "or" => Ok(args
                .iter()
                .find(|v| truthy(v))
                .or(args.last())
                .cloned()
                .unwrap_or(Value::Null)),
            "not" => {
                arity(1)?;
                Ok(Value::Bool(!truthy(&args[0])))
            }
            "int" => {
                arity(1)?;
                let n = match &args[0] {
                    Value::Null => 0,
                    Value::String(s) if s.trim().is_empty() => 0,
                    Value::String(s) => s
                        .trim()
                        .parse::<i64>()
                        .map_err(|_| self.err(line, format!("int: '{s}' is not an integer")))?,
                    other => self.number(other, line)? as i64,
                };
                Ok(Value::from(n))
            }
            "default" => {
                arity(2)?;
                Ok(if truthy(&args[1]) {
                    args[1].clone()
                } else {
                    args[0].clone()
                })
            }
            "quote" => {
                arity(1)?;
                let s = match &args[0] {
                    Value::Null => String::new(),
                    other => self.print(other, line)?,
                };
                Ok(Value::String(go_quote(&s)))
            }
            "required" => {
                arity(2)?;
                match &args[1] {
                    Value::Null => Err(TemplateError::Fail(self.print(&args[0], line)?)),
                    Value::String(s) if s.is_empty() => {
                        Err(TemplateError::Fail(self.print(&args[0], line)?))
                    }
                    v => Ok(v.clone()),
                }
            }
            "fail" => {
                arity(1)?;
                Err(TemplateError::Fail(self.print(&args[0], line)?))
            }
            "include" => {
                arity(2)?;
                let Value::String(tname) = &args[0] else {
                    return Err(self.err(line, "include needs a template name string"));
                };
                let body = self
                    .defines
                    .get(tname)
                    .ok_or_else(|| self.err(line, format!("no template named \"{tname}\"")))?;
                if self.depth >= MAX_INCLUDE_DEPTH {
                    return Err(self.err(line, format!("include of \"{tname}\" nested too deeply")));
                }
                self.depth += 1;
                let rendered = self.render(body, &args[1]);
                self.depth -= 1;
                Ok(Value::String(rendered?))
            }
            "toYaml" => {
                arity(1)?;
                Ok(Value::String(super::to_yaml::to_yaml(&args[0])))
            }
            "indent" | "nindent" => {
                arity(2)?;
                let n = self.number(&args[0], line)?;
                if !(0.0..=256.0).contains(&n) {
                    return Err(self.err(line, format!("{name}: bad width {n}")));
                }
                let pad = " ".repeat(n as usize);
                let text = self.print(&args[1], line)?;
                let indented = text
                    .split('\n')
                    .map(|l| format!("{pad}{l}"))
                    .collect::<Vec<_>>()
                    .join("\n");
                Ok(Value::String(if name == "nindent" {
                    format!("\n{indented}")
                } else {
                    indented
                }))
            }
            "until" => {
                arity(1)?;
                let n = self.number(&args[0], line)?;
                if !(0.0..=10_000.0).contains(&n) {
                    return Err(self.err(line, format!("until: bad count {n}")));
                }
                Ok(Value::Array((0..n as i64).map(Value::from).collect()))
            }
            other => Err(self.err(
                line,
                format!("function \"{other}\" is not supported by this renderer"),
            )),
        }
    }

    fn number(&self, v: &Value, line: usize) -> Result<f64, TemplateError> {
        match v {
            Value::Number(n) => n
                .as_f64()
                .ok_or_else(|| self.err(line, "number out of range")),
            other => Err(self.err(line, format!("expected a number, got {}", kind(other)))),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nil value",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "map",
    }
}

/// Numbers print like Go's `%v` of Helm's float64 values: integral values without a dot.
fn number_text(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{f:.0}"),
        Some(f) => f.to_string(),
        None => n.to_string(),
    }
}

fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Go's `%q` for the characters a YAML value can hold.
pub(super) fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::super::{lex::lex, parse::parse};
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn render(src: &str, data: Value) -> Result<String, TemplateError> {
        let parsed = parse("t", lex("t", src)?)?;
        Evaluator::new("t", &parsed.defines).render(&parsed.body, &data)
    }

    #[test]
    fn fields_conditions_and_functions() {
        let data = json!({"Values": {"a": 3, "s": "x", "list": [1, 2], "m": {"k": "v"}, "e": ""}});
        assert_eq!(render("{{ .Values.a }}", data.clone()).unwrap(), "3");
        assert_eq!(
            render(
                r#"{{ if eq .Values.s "x" }}y{{ else }}n{{ end }}"#,
                data.clone()
            )
            .unwrap(),
            "y"
        );
        assert_eq!(
            render("{{ if gt (int .Values.a) 2 }}big{{ end }}", data.clone()).unwrap(),
            "big"
        );
        assert_eq!(
            render(r#"{{ .Values.e | default "d" | quote }}"#, data.clone()).unwrap(),
            "\"d\""
        );
        assert_eq!(
            render("{{ range .Values.list }}[{{ . }}]{{ end }}", data.clone()).unwrap(),
            "[1][2]"
        );
        assert_eq!(
            render(
                "{{ range $k, $v := .Values.m }}{{ $k }}={{ $v }}{{ end }}",
                data.clone()
            )
            .unwrap(),
            "k=v"
        );
        assert_eq!(
            render("{{ range $i := until 3 }}{{ $i }}{{ end }}", data.clone()).unwrap(),
            "012"
        );
        assert_eq!(
            render("a:{{ toYaml .Values.m | nindent 2 }}", data.clone()).unwrap(),
            "a:\n  k: v"
        );
        assert_eq!(
            render("{{ $x := .Values.s }}{{ $x }}{{ $.Values.a }}", data).unwrap(),
            "x3"
        );
    }

    #[test]
    fn include_renders_a_define_with_the_given_dot() {
        let out = render(
            r#"{{ define "n" }}v={{ .Values.a }}{{ end }}{{ include "n" . | quote }}"#,
            json!({"Values": {"a": 1}}),
        )
        .unwrap();
        assert_eq!(out, "\"v=1\"");
    }

    #[test]
    fn required_and_fail_stop_rendering_with_the_message() {
        let err = render(
            r#"{{ required "name is required" .Values.n }}"#,
            json!({"Values": {}}),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "name is required");
        let err = render(r#"{{ fail "nope" }}"#, json!({})).unwrap_err();
        assert_eq!(err.to_string(), "nope");
    }

    #[test]
    fn field_of_missing_value_is_an_error_not_empty_output() {
        assert!(render("{{ .Values.nope.deeper }}", json!({"Values": {}})).is_err());
        assert_eq!(
            render("{{ .Values.nope }}", json!({"Values": {}})).unwrap(),
            ""
        );
    }

    #[test]
    fn recursive_include_fails_cleanly() {
        let err = render(
            r#"{{ define "r" }}{{ include "r" . }}{{ end }}{{ include "r" . }}"#,
            json!({}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("nested too deeply"), "{err}");
    }

    proptest! {
        /// A quoted string read back by a YAML parser is the original string.
        #[test]
        fn quote_round_trips_through_yaml(s in "[ -~\\n\\t]{0,40}") {
            let out = render("{{ .s | quote }}", json!({"s": s.clone()})).unwrap();
            let back: String = clustermesh_api::yaml::from_str(&out).unwrap();
            prop_assert_eq!(back, s);
        }

        /// Rendering never panics on arbitrary template text.
        #[test]
        fn arbitrary_sources_never_panic(src in "[a-z{}. |()\"$:=-]{0,60}") {
            let _ = render(&src, json!({"a": {"b": 1}}));
        }
    }
}
