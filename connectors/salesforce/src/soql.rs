//! SOQL literals. Every value from data that goes into a query passes through here; names
//! (objects, fields) come from the configuration and are checked as identifiers instead
//! (`config::is_identifier`), because SOQL has no way to quote a name.

use optout_core::Timestamp;

/// A SOQL string literal: single-quoted, with backslash escapes for the backslash, both
/// quotes and the control characters SOQL names. Anything inside stays a value: `' OR Id != '`
/// cannot end the literal.
pub fn string_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A SOQL datetime literal (unquoted, UTC), in whole seconds as Salesforce documents them
/// (`YYYY-MM-DDThh:mm:ssZ`). Rounded down: a bound that is a little early only re-reads
/// rows, which the core recognises, while one a little late could skip them. Real
/// `SystemModstamp` values are whole seconds, so the cursor's ties are exact.
pub fn datetime_literal(t: Timestamp) -> String {
    let whole = Timestamp::from_secs(t.millis().div_euclid(1000));
    whole
        .to_datetime()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_quotes_backslashes_and_controls() {
        assert_eq!(string_literal("O'Brien"), r"'O\'Brien'");
        assert_eq!(string_literal(r"a\b"), r"'a\\b'");
        assert_eq!(string_literal(r"\'"), r"'\\\''");
        assert_eq!(string_literal("' OR Id != '"), r"'\' OR Id != \''");
        assert_eq!(string_literal("x\"\n\r\t"), r#"'x\"\n\r\t'"#);
        assert_eq!(string_literal(""), "''");
        // Between the outer quotes, every quote is preceded by an odd run of backslashes.
        let lit = string_literal(r"\\'\\\'''");
        let inner = &lit[1..lit.len() - 1];
        let mut run = 0;
        for c in inner.chars() {
            if c == '\'' {
                assert_eq!(run % 2, 1, "unescaped quote in {lit}");
            }
            run = if c == '\\' { run + 1 } else { 0 };
        }
    }

    #[test]
    fn datetime_literals_are_whole_seconds_rounded_down() {
        let t = Timestamp::parse("2026-01-02T10:11:12.999+0000").unwrap();
        assert_eq!(datetime_literal(t), "2026-01-02T10:11:12Z");
        let t = Timestamp::parse("2026-01-02T10:11:12.000+0000").unwrap();
        assert_eq!(datetime_literal(t), "2026-01-02T10:11:12Z");
        assert_eq!(datetime_literal(Timestamp(-1)), "1969-12-31T23:59:59Z");
    }
}
