//! Identity: turning what sources call a person into the store's alias keys.
//!
//! Phone numbers become canonical E.164 through the `phonenumber` crate, with the
//! configured default region for numbers written without a country code (CRM free text).
//! A WhatsApp `wa_id` is the number's digits as WhatsApp knows them; it is kept as its own
//! alias too, because it can differ from the CRM's form of the same number (Mexico's
//! `521…` against `52…`, Brazil's ninth digit). A business-scoped user id (BSUID) is an
//! alias of its own. Aliases shown together by one source belong to one subject.
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

    /// Canonical E.164 for a phone number in any common format.
    pub fn phone(&self, raw: &str) -> Result<String, String> {
        let cleaned = clean(raw)?;
        // `00` is the international prefix in most of the world; phonenumber only
        // understands it relative to a region, so treat it as `+` ourselves.
        let cleaned = match cleaned.strip_prefix("00") {
            Some(rest) if !cleaned.starts_with('+') => format!("+{rest}"),
            _ => cleaned,
        };
        let number = phonenumber::parse(Some(self.region), &cleaned)
            .map_err(|e| format!("not a phone number ({e})"))?;
        if !phonenumber::is_valid(&number) {
            return Err("not a valid phone number for its region".to_string());
        }
        Ok(number.format().mode(Mode::E164).to_string())
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
        if s.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) && s.contains('.') {
            return self.aliases(&Identity::Bsuid(s.to_string()));
        }
        self.aliases(&Identity::Phone(s.to_string())).map(|mut a| {
            a.truncate(1);
            a
        })
    }
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
    }
}
