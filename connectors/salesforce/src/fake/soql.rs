//! The fake org's SOQL: a tokenizer and recursive-descent parser for the subset the connector
//! uses (`SELECT fields FROM object [WHERE expr] [ORDER BY field [ASC|DESC], …] [LIMIT n]`,
//! comparisons of a field with a string, datetime, boolean, number or NULL literal, combined
//! with AND, OR, NOT and parentheses), and its evaluation against a row.
//!
//! Like Salesforce it refuses AND and OR mixed at one level without parentheses, unquoted
//! strings, quoted datetimes and unknown escapes; the server answers those `MALFORMED_QUERY`.

use std::cmp::Ordering;

#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Str(String),
    /// Milliseconds since the epoch.
    DateTime(i64),
    Bool(bool),
    Number(f64),
    Null,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Cmp {
        field: String,
        op: Op,
        value: Literal,
    },
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct OrderKey {
    pub field: String,
    pub desc: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub fields: Vec<String>,
    pub object: String,
    pub filter: Option<Expr>,
    pub order: Vec<OrderKey>,
    pub limit: Option<usize>,
}

/// Why a query does not parse (the server's `MALFORMED_QUERY` message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError(pub String);

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    DateTime(i64),
    Number(f64),
    Op(Op),
    LParen,
    RParen,
    Comma,
}

const KEYWORDS: &[&str] = &[
    "SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "ORDER", "BY", "ASC", "DESC", "LIMIT", "NULL",
    "TRUE", "FALSE",
];

fn err<T>(msg: impl Into<String>) -> Result<T, SyntaxError> {
    Err(SyntaxError(msg.into()))
}

fn tokenize(src: &str) -> Result<Vec<Token>, SyntaxError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push(Token::LParen);
                i += 1
            }
            ')' => {
                out.push(Token::RParen);
                i += 1
            }
            ',' => {
                out.push(Token::Comma);
                i += 1
            }
            '=' => {
                out.push(Token::Op(Op::Eq));
                i += 1
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                out.push(Token::Op(Op::Ne));
                i += 2
            }
            '<' => match chars.get(i + 1) {
                Some('=') => {
                    out.push(Token::Op(Op::Le));
                    i += 2
                }
                Some('>') => {
                    out.push(Token::Op(Op::Ne));
                    i += 2
                }
                _ => {
                    out.push(Token::Op(Op::Lt));
                    i += 1
                }
            },
            '>' => {
                if chars.get(i + 1) == Some(&'=') {
                    out.push(Token::Op(Op::Ge));
                    i += 2
                } else {
                    out.push(Token::Op(Op::Gt));
                    i += 1
                }
            }
            '\'' => {
                let mut s = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return err("unterminated string literal"),
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => {
                            let e = match chars.get(i + 1) {
                                Some('\\') => '\\',
                                Some('\'') => '\'',
                                Some('"') => '"',
                                Some('n') => '\n',
                                Some('r') => '\r',
                                Some('t') => '\t',
                                Some('b') => '\u{8}',
                                Some('f') => '\u{c}',
                                Some(other) => {
                                    return err(format!(
                                        "Invalid string literal: illegal escape sequence \\{other}"
                                    ));
                                }
                                None => return err("unterminated string literal"),
                            };
                            s.push(e);
                            i += 2;
                        }
                        Some(&ch) => {
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                out.push(Token::Str(s));
            }
            c if c.is_ascii_digit() => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric()
                        || matches!(chars[i], ':' | '.' | '+' | '-'))
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                // Salesforce documents `YYYY-MM-DDThh:mm:ss` with `Z` or an offset: whole
                // seconds, no fraction.
                if word.contains('T') {
                    match chrono::DateTime::parse_from_rfc3339(&word)
                        .map_err(|_| ())
                        .and_then(|dt| if word.contains('.') { Err(()) } else { Ok(dt) })
                    {
                        Ok(dt) => out.push(Token::DateTime(dt.timestamp_millis())),
                        Err(_) => {
                            return err(format!(
                                "line 1:{start} no viable alternative at character '{word}'"
                            ));
                        }
                    }
                } else {
                    match word.parse::<f64>() {
                        Ok(n) => out.push(Token::Number(n)),
                        Err(_) => return err(format!("unexpected token: '{word}'")),
                    }
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | '.'))
                {
                    i += 1;
                }
                out.push(Token::Ident(chars[start..i].iter().collect()));
            }
            other => return err(format!("unexpected character '{other}'")),
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn is_keyword(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Token::Ident(w)) if w.eq_ignore_ascii_case(kw))
    }

    fn expect_keyword(&mut self, kw: &str) -> Result<(), SyntaxError> {
        if self.is_keyword(kw) {
            self.pos += 1;
            Ok(())
        } else {
            err(format!("expected {kw}, found {}", self.describe()))
        }
    }

    fn describe(&self) -> String {
        match self.peek() {
            None => "end of query".into(),
            Some(Token::Ident(w)) | Some(Token::Str(w)) => format!("'{w}'"),
            Some(t) => format!("{t:?}"),
        }
    }

    fn name(&mut self) -> Result<String, SyntaxError> {
        match self.peek() {
            Some(Token::Ident(w)) if !KEYWORDS.iter().any(|k| w.eq_ignore_ascii_case(k)) => {
                let w = w.clone();
                self.pos += 1;
                Ok(w)
            }
            _ => err(format!("unexpected token: {}", self.describe())),
        }
    }

    fn query(&mut self) -> Result<Query, SyntaxError> {
        self.expect_keyword("SELECT")?;
        let mut fields = vec![self.name()?];
        while self.peek() == Some(&Token::Comma) {
            self.pos += 1;
            fields.push(self.name()?);
        }
        self.expect_keyword("FROM")?;
        let object = self.name()?;
        let mut filter = None;
        if self.is_keyword("WHERE") {
            self.pos += 1;
            filter = Some(self.expr()?);
        }
        let mut order = Vec::new();
        if self.is_keyword("ORDER") {
            self.pos += 1;
            self.expect_keyword("BY")?;
            loop {
                let field = self.name()?;
                let desc = if self.is_keyword("DESC") {
                    self.pos += 1;
                    true
                } else {
                    if self.is_keyword("ASC") {
                        self.pos += 1;
                    }
                    false
                };
                order.push(OrderKey { field, desc });
                if self.peek() == Some(&Token::Comma) {
                    self.pos += 1;
                } else {
                    break;
                }
            }
        }
        let mut limit = None;
        if self.is_keyword("LIMIT") {
            self.pos += 1;
            match self.next() {
                Some(Token::Number(n)) if n >= 0.0 && n.fract() == 0.0 => limit = Some(n as usize),
                _ => return err("LIMIT needs a whole number"),
            }
        }
        if self.peek().is_some() {
            return err(format!("unexpected token: {}", self.describe()));
        }
        Ok(Query {
            fields,
            object,
            filter,
            order,
            limit,
        })
    }

    /// One level of AND or OR (not both: SOQL wants parentheses to mix them).
    fn expr(&mut self) -> Result<Expr, SyntaxError> {
        let first = self.unary()?;
        let joiner = if self.is_keyword("AND") {
            "AND"
        } else if self.is_keyword("OR") {
            "OR"
        } else {
            return Ok(first);
        };
        let mut parts = vec![first];
        while self.is_keyword(joiner) {
            self.pos += 1;
            parts.push(self.unary()?);
        }
        if self.is_keyword("AND") || self.is_keyword("OR") {
            return err(format!(
                "unexpected token: {} (use parentheses to mix AND and OR)",
                self.describe()
            ));
        }
        Ok(if joiner == "AND" {
            Expr::And(parts)
        } else {
            Expr::Or(parts)
        })
    }

    fn unary(&mut self) -> Result<Expr, SyntaxError> {
        if self.is_keyword("NOT") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.peek() == Some(&Token::LParen) {
            self.pos += 1;
            let e = self.expr()?;
            if self.next() != Some(Token::RParen) {
                return err("expected ')'");
            }
            return Ok(e);
        }
        let field = self.name()?;
        let op = match self.next() {
            Some(Token::Op(op)) => op,
            _ => return err(format!("expected a comparison after {field}")),
        };
        let value = match self.next() {
            Some(Token::Str(s)) => Literal::Str(s),
            Some(Token::DateTime(t)) => Literal::DateTime(t),
            Some(Token::Number(n)) => Literal::Number(n),
            Some(Token::Ident(w)) if w.eq_ignore_ascii_case("TRUE") => Literal::Bool(true),
            Some(Token::Ident(w)) if w.eq_ignore_ascii_case("FALSE") => Literal::Bool(false),
            Some(Token::Ident(w)) if w.eq_ignore_ascii_case("NULL") => Literal::Null,
            Some(Token::Ident(w)) => {
                return err(format!("unexpected token: '{w}' (strings must be quoted)"));
            }
            _ => return err(format!("expected a value after {field}")),
        };
        Ok(Expr::Cmp { field, op, value })
    }
}

pub fn parse(src: &str) -> Result<Query, SyntaxError> {
    let tokens = tokenize(src)?;
    Parser { tokens, pos: 0 }.query()
}

/// Compares two values of one field; `None` when either is NULL or the kinds differ.
pub fn compare(a: &Literal, b: &Literal) -> Option<Ordering> {
    match (a, b) {
        (Literal::Str(x), Literal::Str(y)) => Some(x.cmp(y)),
        (Literal::DateTime(x), Literal::DateTime(y)) => Some(x.cmp(y)),
        (Literal::Bool(x), Literal::Bool(y)) => Some(x.cmp(y)),
        (Literal::Number(x), Literal::Number(y)) => x.partial_cmp(y),
        _ => None,
    }
}

impl Expr {
    /// Evaluates against a row; `get` returns a field's value (`Literal::Null` when empty).
    pub fn matches(&self, get: &dyn Fn(&str) -> Literal) -> bool {
        match self {
            Expr::And(parts) => parts.iter().all(|p| p.matches(get)),
            Expr::Or(parts) => parts.iter().any(|p| p.matches(get)),
            Expr::Not(e) => !e.matches(get),
            Expr::Cmp { field, op, value } => {
                let actual = get(field);
                match (op, &actual, value) {
                    (Op::Eq, Literal::Null, Literal::Null) => true,
                    (Op::Ne, Literal::Null, Literal::Null) => false,
                    (Op::Eq, _, Literal::Null) | (Op::Eq, Literal::Null, _) => false,
                    (Op::Ne, _, Literal::Null) | (Op::Ne, Literal::Null, _) => true,
                    // Text equality is case-insensitive in SOQL.
                    (Op::Eq, Literal::Str(a), Literal::Str(b)) => {
                        a.to_lowercase() == b.to_lowercase()
                    }
                    (Op::Ne, Literal::Str(a), Literal::Str(b)) => {
                        a.to_lowercase() != b.to_lowercase()
                    }
                    _ => match compare(&actual, value) {
                        None => false,
                        Some(o) => match op {
                            Op::Eq => o == Ordering::Equal,
                            Op::Ne => o != Ordering::Equal,
                            Op::Lt => o == Ordering::Less,
                            Op::Le => o != Ordering::Greater,
                            Op::Gt => o == Ordering::Greater,
                            Op::Ge => o != Ordering::Less,
                        },
                    },
                }
            }
        }
    }

    /// Every comparison, for type checks against the object's fields.
    pub fn comparisons(&self) -> Vec<(&str, &Literal)> {
        match self {
            Expr::Cmp { field, value, .. } => vec![(field.as_str(), value)],
            Expr::And(p) | Expr::Or(p) => p.iter().flat_map(Expr::comparisons).collect(),
            Expr::Not(e) => e.comparisons(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_connectors_query() {
        let q = parse(
            "SELECT Id, SystemModstamp FROM MessagingEndUser WHERE MessageType = 'WhatsApp' AND \
             (SystemModstamp > 2026-01-02T10:11:12Z OR (SystemModstamp = 2026-01-02T10:11:12Z AND Id > '0PA\\'x')) \
             ORDER BY SystemModstamp, Id DESC LIMIT 10",
        )
        .unwrap();
        assert_eq!(q.fields, ["Id", "SystemModstamp"]);
        assert_eq!(q.object, "MessagingEndUser");
        assert_eq!(q.limit, Some(10));
        assert_eq!(
            q.order,
            [
                OrderKey {
                    field: "SystemModstamp".into(),
                    desc: false
                },
                OrderKey {
                    field: "Id".into(),
                    desc: true
                }
            ]
        );
        let t = 1767348672000;
        let row = |id: &'static str, ms: i64| {
            move |f: &str| match f {
                "MessageType" => Literal::Str("whatsapp".into()),
                "SystemModstamp" => Literal::DateTime(ms),
                "Id" => Literal::Str(id.into()),
                _ => Literal::Null,
            }
        };
        let filter = q.filter.unwrap();
        assert!(filter.matches(&row("0PA'y", t)));
        assert!(!filter.matches(&row("0PA'x", t)));
        assert!(filter.matches(&row("0", t + 1)));
        assert!(!filter.matches(&row("z", t - 1)));
    }

    #[test]
    fn refuses_malformed_queries() {
        for bad in [
            "",
            "SELECT FROM Contact",
            "SELECT Id Contact",
            "SELECT Id FROM Contact WHERE",
            "SELECT Id FROM Contact WHERE A = 1 AND B = 2 OR C = 3",
            "SELECT Id FROM Contact WHERE Name = O'Brien",
            "SELECT Id FROM Contact WHERE Name = 'unterminated",
            "SELECT Id FROM Contact WHERE Name = 'bad \\q escape'",
            "SELECT Id FROM Contact WHERE (Name = 'x'",
            "SELECT Id FROM Contact WHERE SystemModstamp > 2026-13-01T00:00:00Z",
            // Salesforce documents datetime literals in whole seconds.
            "SELECT Id FROM Contact WHERE SystemModstamp > 2026-01-02T10:11:12.345Z",
            "SELECT Id FROM Contact WHERE Name = Smith",
            "SELECT Id FROM Contact LIMIT x",
            "SELECT Id FROM Contact ORDER Id",
            "SELECT Id FROM Contact; DELETE",
            "SELECT Id FROM Contact WHERE Name = 'a' ' OR Id != ''",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn string_literals_round_trip_through_the_connectors_escaping() {
        // Every string of up to four characters over a hostile alphabet.
        let alphabet = ['a', '\'', '\\', '"', '\n', ' ', 'O', '%'];
        let mut words = vec![String::new()];
        for _ in 0..4 {
            let mut longer = Vec::new();
            for w in &words {
                for c in alphabet {
                    longer.push(format!("{w}{c}"));
                }
            }
            words.extend(longer.into_iter().filter(|w| w.chars().count() <= 4));
            words.sort();
            words.dedup();
        }
        assert!(words.len() > 4000);
        for w in &words {
            let q = format!(
                "SELECT Id FROM Contact WHERE LastName = {}",
                crate::soql::string_literal(w)
            );
            let parsed = parse(&q).unwrap_or_else(|e| panic!("{q}: {e:?}"));
            assert_eq!(
                parsed.filter,
                Some(Expr::Cmp {
                    field: "LastName".into(),
                    op: Op::Eq,
                    value: Literal::Str(w.clone())
                }),
                "{q}"
            );
        }
    }
}
