//! Identity: turning what sources call a person into the store's alias keys.
//!
//! Phone numbers become canonical E.164 through the `phonenumber` crate, with the
//! configured default region for numbers written without a country code (CRM free text).
//! What people type around a number is tolerated first: a `tel:` URI, an extension, a
//! trunk prefix kept after the country code (`+44 (0)7911…`, dropped only for the countries
//! of [`TRUNK_ZERO`]: Italy's leading 0 belongs to the number).
//!
//! A WhatsApp `wa_id` is the number's digits as WhatsApp knows them; it is kept as its own
//! alias too. Where WhatsApp's digits and the national numbering disagree, the data table
//! [`COUNTRY_RULES`] names the other form of the same digits and how far the two may be
//! linked: [`Link::Same`] (the same subscriber: both forms are one person) or
//! [`Link::SuppressOnly`] (the other form may be someone else: an opt-out reaches it, an
//! opt-in does not). A business-scoped user id (BSUID) is an alias of its own. Aliases
//! shown together by one source belong to one subject.
//!
//! Pure: no I/O, and never panics on hostile input.

use optout_core::Identity;
use phonenumber::{Mode, country};

/// The longest identity value we accept; longer input is refused, not truncated.
const MAX_LEN: usize = 256;

/// A normalised alias key as stored: `p:+15551234567`, `w:15551234567`, `b:US.1349…`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Alias(String);

impl Alias {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn from_stored(s: String) -> Alias {
        Alias(s)
    }

    /// The E.164 number if this is a phone alias.
    pub fn phone(&self) -> Option<&str> {
        self.0.strip_prefix("p:")
    }

    /// The identity this alias stands for, as connectors know it.
    pub fn to_identity(&self) -> Identity {
        match self.0.split_at(2) {
            ("p:", v) => Identity::Phone(v.to_string()),
            ("w:", v) => Identity::WaId(v.to_string()),
            (_, v) => Identity::Bsuid(v.to_string()),
        }
    }
}

impl std::fmt::Display for Alias {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How far a country rule's other form of a number is linked to the form observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// The same subscriber: both forms are aliases of one person.
    Same,
    /// Possibly another subscriber: an opt-out of either form reaches the other, an opt-in
    /// reaches only the form it came from.
    SuppressOnly,
}

/// One country's rule: a digit that WhatsApp's ids and the numbers people keep may have or
/// lack at one place. The *long* form has `digit` at `offset` digits after the country
/// code, followed by a digit in `next` (any digit when empty); the *short* form lacks it
/// and has `short_len` national digits.
#[derive(Debug, PartialEq, Eq)]
pub struct CountryRule {
    pub country: &'static str,
    /// Country calling code, digits only.
    pub code: &'static str,
    pub offset: usize,
    pub digit: char,
    pub short_len: usize,
    pub next: &'static str,
    pub link: Link,
    /// Why the forms are linked, for `lookup`.
    pub why: &'static str,
}

/// The country rules. A new country is one entry here (and its source in the README).
pub const COUNTRY_RULES: &[CountryRule] = &[
    CountryRule {
        country: "Brazil",
        code: "55",
        offset: 2,
        digit: '9',
        short_len: 10,
        // Mobile numbers gained a leading 9 (2012-2016); only the 8-digit mobile ranges
        // (6-9) had it added, so a 2-5 after the 9 would make the short form a landline.
        next: "6789",
        link: Link::Same,
        why: "Brazil's ninth mobile digit: WhatsApp ids of older accounts lack it",
    },
    CountryRule {
        country: "Mexico",
        code: "52",
        offset: 0,
        digit: '1',
        short_len: 10,
        next: "",
        link: Link::Same,
        why: "Mexico's former mobile prefix 1: WhatsApp ids keep 521, numbers are 52",
    },
    CountryRule {
        country: "Argentina",
        code: "54",
        offset: 0,
        digit: '9',
        short_len: 10,
        next: "",
        link: Link::SuppressOnly,
        why: "Argentina's international mobile 9: without it the digits may be a landline",
    },
];

/// Country codes whose trunk prefix `0` is often kept after the country code
/// (`+44 (0)20…`) and must be dropped. Countries where a leading 0 is part of the
/// international number (Italy, San Marino, Vatican) are deliberately absent, and so are
/// those without a trunk prefix (Spain, Portugal, Greece, Poland, Denmark, Norway) or with
/// another one (Hungary's `06`). No code here is a prefix of another.
pub const TRUNK_ZERO: &[&str] = &[
    "353", "358", "972", "20", "27", "31", "32", "33", "41", "43", "44", "46", "49", "61", "62",
    "63", "64", "66", "81", "82", "84", "86", "90", "91", "92",
];

/// Another form of a number, linked by a country rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variant {
    pub alias: Alias,
    pub link: Link,
    pub rule: &'static CountryRule,
}

/// The other forms of international digits (no `+`) under the country rules, whether or
/// not they are valid numbers.
pub fn digit_variants(digits: &str) -> Vec<(String, &'static CountryRule)> {
    let mut out = Vec::new();
    for rule in COUNTRY_RULES {
        let Some(nat) = digits.strip_prefix(rule.code) else {
            continue;
        };
        let ok_next = |c: Option<char>| {
            c.is_some_and(|c| c.is_ascii_digit() && (rule.next.is_empty() || rule.next.contains(c)))
        };
        if nat.len() == rule.short_len && nat.len() > rule.offset {
            let (head, tail) = nat.split_at(rule.offset);
            if ok_next(tail.chars().next()) {
                out.push((format!("{}{head}{}{tail}", rule.code, rule.digit), rule));
            }
        } else if nat.len() == rule.short_len + 1 && nat.len() > rule.offset + 1 {
            let (head, tail) = nat.split_at(rule.offset);
            let mut t = tail.chars();
            if t.next() == Some(rule.digit) && ok_next(t.clone().next()) {
                out.push((format!("{}{head}{}", rule.code, t.as_str()), rule));
            }
        }
    }
    out
}

/// Normalises identities with one default region.
#[derive(Clone, Debug)]
pub struct Normalizer {
    region: country::Id,
}

impl Normalizer {
    pub fn new(region: country::Id) -> Self {
        Normalizer { region }
    }

    /// Parses a two-letter region code (`US`, `GB`).
    pub fn parse_region(code: &str) -> Option<country::Id> {
        code.trim().to_ascii_uppercase().parse().ok()
    }

    /// Canonical E.164 for a phone number in any common format. A number that is not
    /// valid as written but is under a [`Link::Same`] country rule (a Brazilian mobile
    /// without its ninth digit, a Mexican `+52 1…`) becomes the valid form.
    pub fn phone(&self, raw: &str) -> Result<String, String> {
        let cleaned = typed(&clean(raw)?);
        let first = self.parse_valid(&cleaned);
        let Err(why) = first else {
            return first;
        };
        if let Some(stripped) = strip_trunk_zero(&cleaned)
            && let Ok(e164) = self.parse_valid(&stripped)
        {
            return Ok(e164);
        }
        // The digits as parsed (country code and national number, valid or not), for the
        // country rules.
        let Ok(number) = self.parse(&cleaned) else {
            return Err(why);
        };
        let e164 = number.format().mode(Mode::E164).to_string();
        digit_variants(e164.trim_start_matches('+'))
            .into_iter()
            .filter(|(_, r)| r.link == Link::Same)
            .find_map(|(d, _)| self.parse_valid(&format!("+{d}")).ok())
            .ok_or(why)
    }

    /// `phonenumber`'s E.164 for a valid number.
    fn parse_valid(&self, cleaned: &str) -> Result<String, String> {
        let number = self
            .parse(cleaned)
            .map_err(|e| format!("not a phone number ({e})"))?;
        if !phonenumber::is_valid(&number) {
            return Err("not a valid phone number for its region".to_string());
        }
        Ok(number.format().mode(Mode::E164).to_string())
    }

    /// Parses with the default region only for a number without `+`: `phonenumber` would
    /// otherwise strip the default region's national prefix from an international number
    /// (`+54 11…` read with region US lost its `1` and was refused).
    fn parse(&self, cleaned: &str) -> Result<phonenumber::PhoneNumber, phonenumber::ParseError> {
        let region = (!cleaned.trim_start().starts_with('+')).then_some(self.region);
        phonenumber::parse(region, cleaned)
    }

    /// The other forms of an alias's number under the country rules that are valid
    /// numbers, as phone aliases (for a `w:` alias, relative to its phone form).
    pub fn variants(&self, alias: &Alias) -> Vec<Variant> {
        let digits = match alias.as_str().split_at(2) {
            ("p:", v) => v.trim_start_matches('+'),
            ("w:", v) => v,
            _ => return Vec::new(),
        };
        let own = alias.phone().map(str::to_string);
        let mut out: Vec<Variant> = Vec::new();
        for (d, rule) in digit_variants(digits) {
            let Ok(e164) = self.parse_valid(&format!("+{d}")) else {
                continue;
            };
            let a = Alias(format!("p:{e164}"));
            if own.as_deref() != Some(e164.as_str()) && !out.iter().any(|v| v.alias == a) {
                out.push(Variant {
                    alias: a,
                    link: rule.link,
                    rule,
                });
            }
        }
        out
    }

    /// The suppress-only variants of a set of aliases that are not among them: where an
    /// opt-out observed for these aliases must also be recorded.
    pub fn suppress_only(&self, aliases: &[Alias]) -> Vec<Variant> {
        let mut out: Vec<Variant> = Vec::new();
        for a in aliases {
            for v in self.variants(a) {
                if v.link == Link::SuppressOnly
                    && !aliases.contains(&v.alias)
                    && !out.iter().any(|o| o.alias == v.alias)
                {
                    out.push(v);
                }
            }
        }
        out
    }

    /// The aliases one identity yields. A `wa_id` gives its own alias and, when its digits
    /// form a valid number, the E.164 phone alias too (so a WhatsApp STOP reaches CRM
    /// records holding the number).
    pub fn aliases(&self, identity: &Identity) -> Result<Vec<Alias>, String> {
        match identity {
            Identity::Phone(raw) => Ok(vec![Alias(format!("p:{}", self.phone(raw)?))]),
            Identity::WaId(raw) => {
                let digits: String = clean(raw)?.chars().filter(|c| c.is_ascii_digit()).collect();
                if digits.len() < 6 || digits.len() > 15 {
                    return Err(format!("wa_id has {} digits", digits.len()));
                }
                let mut out = vec![Alias(format!("w:{digits}"))];
                if let Ok(e164) = self.phone(&format!("+{digits}")) {
                    out.push(Alias(format!("p:{e164}")));
                }
                // Both forms of the same subscriber, should both be valid numbers.
                for v in self.variants(&out[0]) {
                    if v.link == Link::Same && !out.contains(&v.alias) {
                        out.push(v.alias);
                    }
                }
                Ok(out)
            }
            Identity::Bsuid(raw) => {
                let id = clean(raw)?;
                let ok = id.len() >= 4
                    && id.contains('.')
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-');
                if !ok {
                    return Err("not a business-scoped user id (expected CC.<id>)".to_string());
                }
                Ok(vec![Alias(format!("b:{id}"))])
            }
        }
    }

    /// Parses what an operator types (`lookup`, the send gate): a phone number in any
    /// format, `wa:<digits>`, or a BSUID.
    pub fn parse_query(&self, input: &str) -> Result<Vec<Alias>, String> {
        let s = input.trim();
        if let Some(w) = s.strip_prefix("wa:") {
            return self.aliases(&Identity::WaId(w.to_string()));
        }
        // `portfolio/US.123…`: a business-scoped id of a WhatsApp account whose ids are kept
        // apart under its portfolio (or instance) name.
        if let Some((ns, id)) = s.split_once('/')
            && !ns.is_empty()
            && ns
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            let aliases = self.aliases(&Identity::Bsuid(id.to_string()))?;
            return Ok(aliases
                .into_iter()
                .map(|a| match a.as_str().strip_prefix("b:") {
                    Some(id) => Alias::from_stored(format!("b:{ns}/{id}")),
                    None => a,
                })
                .collect());
        }
        if s.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) && s.contains('.') {
            return self.aliases(&Identity::Bsuid(s.to_string()));
        }
        self.aliases(&Identity::Phone(s.to_string())).map(|mut a| {
            a.truncate(1);
            a
        })
    }
}

/// What people type around a number, removed: a `tel:` URI's scheme and parameters
/// (`;ext=`, `;phone-context=`), and a parenthesised remark without digits (`(mobile)`).
/// Extensions (`x123`, `ext. 5`, `#12`) are left to `phonenumber`, which drops them.
fn typed(s: &str) -> String {
    let mut s = s.trim();
    if let Some(scheme) = s.get(..4)
        && scheme.eq_ignore_ascii_case("tel:")
    {
        s = s[4..].split(';').next().unwrap_or("");
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(open) = rest.find('(') {
        let Some(close) = rest[open..].find(')') else {
            break;
        };
        let inner = &rest[open + 1..open + close];
        out.push_str(&rest[..open]);
        if inner.chars().any(|c| c.is_ascii_digit()) {
            out.push_str(&rest[open..=open + close]);
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    // `00` is the international prefix in most of the world; phonenumber only
    // understands it relative to a region, so treat it as `+` ourselves.
    let out = out.trim().to_string();
    match out.strip_prefix("00") {
        Some(rest) => format!("+{rest}"),
        None => out,
    }
}

/// An international number with its trunk `0` (written `0` or `(0)`) after a country
/// code of [`TRUNK_ZERO`] removed; `None` when there is none to remove.
fn strip_trunk_zero(s: &str) -> Option<String> {
    let rest = s.strip_prefix('+')?.trim_start();
    for cc in TRUNK_ZERO {
        let Some(after) = rest.strip_prefix(cc) else {
            continue;
        };
        let after = after.trim_start_matches([' ', '-', '.', '/']);
        let national = after
            .strip_prefix("(0)")
            .or_else(|| after.strip_prefix('0'))?;
        return Some(format!("+{cc} {national}"));
    }
    None
}

/// Trims, bounds the length and refuses control characters.
fn clean(raw: &str) -> Result<String, String> {
    let s = raw.trim();
    if s.is_empty() {
        return Err("empty".to_string());
    }
    if s.len() > MAX_LEN {
        return Err(format!("longer than {MAX_LEN} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err("contains control characters".to_string());
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n() -> Normalizer {
        Normalizer::new(Normalizer::parse_region("US").unwrap())
    }

    #[test]
    fn phone_formats_normalise_to_one_number() {
        let forms = [
            "+1 (415) 555-2671",
            "415.555.2671",
            "(415) 555 2671",
            "+14155552671",
            "001 415 555 2671",
            " 4155552671 ",
        ];
        for f in forms {
            assert_eq!(n().phone(f).as_deref(), Ok("+14155552671"), "{f}");
        }
        assert_eq!(
            n().phone("+44 20 7946 0958").as_deref(),
            Ok("+442079460958")
        );
        // An international number is not read with the default region's national prefix
        // (US `1`): Buenos Aires `11` and Paris `1` keep their leading 1.
        assert_eq!(
            n().phone("+54 11 2345-6789").as_deref(),
            Ok("+541123456789")
        );
        assert_eq!(
            n().phone("+33 1 42 68 53 00").as_deref(),
            Ok("+33142685300")
        );
    }

    #[test]
    fn bad_numbers_are_rejected_with_a_reason() {
        for bad in [
            "",
            "abc",
            "12",
            "+1 555",
            "\u{0}4155552671",
            &"9".repeat(1000),
        ] {
            let r = n().phone(bad);
            assert!(r.is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn wa_id_yields_wa_and_phone_aliases() {
        let a = n().aliases(&Identity::WaId("14155552671".into())).unwrap();
        assert_eq!(
            a.iter().map(Alias::as_str).collect::<Vec<_>>(),
            ["w:14155552671", "p:+14155552671"]
        );
        let b = n()
            .aliases(&Identity::Bsuid("US.13491208655302741918".into()))
            .unwrap();
        assert_eq!(b[0].as_str(), "b:US.13491208655302741918");
        assert!(n().aliases(&Identity::Bsuid("'; DROP".into())).is_err());
        assert_eq!(
            b[0].to_identity(),
            Identity::Bsuid("US.13491208655302741918".into())
        );
    }

    #[test]
    fn queries() {
        assert_eq!(
            n().parse_query("+1 415 555 2671").unwrap()[0].as_str(),
            "p:+14155552671"
        );
        assert_eq!(
            n().parse_query("US.123456").unwrap()[0].as_str(),
            "b:US.123456"
        );
        assert_eq!(
            n().parse_query("wa:14155552671").unwrap()[0].as_str(),
            "w:14155552671"
        );
        // A second WhatsApp account's ids are asked for under its portfolio.
        assert_eq!(
            n().parse_query("brand-b/US.123456").unwrap()[0].as_str(),
            "b:brand-b/US.123456"
        );
        assert!(n().parse_query("brand b/US.123456").is_err());
    }
    fn wa(digits: &str) -> Vec<String> {
        n().aliases(&Identity::WaId(digits.into()))
            .unwrap()
            .iter()
            .map(|a| a.as_str().to_string())
            .collect()
    }

    #[test]
    fn brazil_ninth_digit_both_directions() {
        // A legacy id (no 9) reaches the nine-digit number; a nine-digit id stays itself.
        assert_eq!(wa("554188887777"), ["w:554188887777", "p:+5541988887777"]);
        assert_eq!(wa("5541988887777"), ["w:5541988887777", "p:+5541988887777"]);
        // A CRM number kept without the 9 is the same subscriber.
        assert_eq!(
            n().phone("+55 41 8888-7777").as_deref(),
            Ok("+5541988887777")
        );
        assert_eq!(
            n().phone("+55 (41) 98888-7777").as_deref(),
            Ok("+5541988887777")
        );
        // A landline (2-5) gains no 9: it is not a mobile.
        assert_eq!(
            n().phone("+55 41 3333-4444").as_deref(),
            Ok("+554133334444")
        );
        let v = n().variants(&Alias::from_stored("w:554188887777".into()));
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].link, v[0].rule.country), (Link::Same, "Brazil"));
    }

    #[test]
    fn mexico_521_is_52() {
        assert_eq!(wa("5215512345678"), ["w:5215512345678", "p:+525512345678"]);
        assert_eq!(
            n().phone("+52 1 55 1234 5678").as_deref(),
            Ok("+525512345678")
        );
        assert_eq!(
            n().phone("+52 55 1234 5678").as_deref(),
            Ok("+525512345678")
        );
    }

    #[test]
    fn argentina_549_is_suppress_only() {
        let a = n()
            .aliases(&Identity::WaId("5491123456789".into()))
            .unwrap();
        assert_eq!(
            a[1].as_str(),
            "p:+5491123456789",
            "not merged with the landline form"
        );
        assert_eq!(a.len(), 2);
        let s = n().suppress_only(&a);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].alias.as_str(), "p:+541123456789");
        assert_eq!(s[0].link, Link::SuppressOnly);
        // And back: an opt-out of the short form reaches the mobile form.
        let back = n().suppress_only(&[Alias::from_stored("p:+541123456789".into())]);
        assert_eq!(back[0].alias.as_str(), "p:+5491123456789");
        // Other countries have none.
        assert!(n().suppress_only(&wa_aliases("14155552671")).is_empty());
    }

    fn wa_aliases(d: &str) -> Vec<Alias> {
        n().aliases(&Identity::WaId(d.into())).unwrap()
    }

    #[test]
    fn numbers_as_people_type_them() {
        let gb = [
            "+44 (0)7911 123456",
            "+44 (0) 7911 123456",
            "+44(0)7911-123456",
            "0044 (0)7911 123456",
            "+44 07911 123456",
            "tel:+44-7911-123456;ext=12",
            "TEL:+447911123456",
            "+44 7911 123456 ext. 5",
            "+44 7911 123456 x123",
            "+44 7911 123456 (mobile)",
            "+44.7911.123456.",
            "'+44 7911 123456",
        ];
        for f in gb {
            assert_eq!(n().phone(f).as_deref(), Ok("+447911123456"), "{f}");
        }
        assert_eq!(
            n().phone("+49 (0) 30 1234567").as_deref(),
            Ok("+49301234567")
        );
        assert_eq!(
            n().phone("+33 (0)1 23 45 67 89").as_deref(),
            Ok("+33123456789")
        );
        // Italy's leading 0 is part of the number.
        assert_eq!(
            n().phone("+39 06 1234 5678").as_deref(),
            Ok("+390612345678")
        );
        assert_eq!(
            n().phone("+39 (0)6 1234 5678").as_deref(),
            Ok("+390612345678")
        );
        assert!(n().phone("+44 7911 123456 / 7911 654321").is_err());
        assert!(n().phone("tel:").is_err());
        assert!(n().phone("(((").is_err());
        // Multi-byte characters where a scheme or a bracket would be: refused, no panic.
        for hostile in [
            "ü€",
            "€€€€€",
            "t€l:1",
            "(€)",
            "+44 (0€",
            "+44 (ü) 7911 123456",
            "tel:€",
        ] {
            let _ = n().phone(hostile);
            let _ = n().parse_query(hostile);
        }
    }

    #[test]
    fn digit_variants_never_panic() {
        for d in [
            "",
            "5",
            "55",
            "559",
            "54",
            "549",
            "52",
            "521",
            "5599999999999999999",
        ] {
            let _ = digit_variants(d);
        }
        assert_eq!(
            digit_variants("5491123456789")[0].0,
            "541123456789".to_string()
        );
    }
}
