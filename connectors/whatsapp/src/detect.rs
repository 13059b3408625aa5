//! Keyword and button detection: does a customer's message say "opt me out" or "opt me back
//! in"? Pure and configurable; the default lists live here, in one place (`KEYWORDS.md`
//! documents them with their sources).
//!
//! The asymmetry is deliberate. A missed opt-out is a compliance failure and a false one
//! only costs a message, so opt-out matching is tolerant: case, punctuation, emoji,
//! diacritics and full-width forms are ignored, and the keyword may come with polite
//! filler ("stop please", "Unsubscribe me!", "bitte abmelden"). A false opt-in would
//! message someone who said stop, so opt-in needs the whole message to be exactly the
//! keyword ("START", "start!"), never "start date?".
//!
//! Look-alikes stay silent because every word around the keyword must be filler: in
//! "don't stop", "stop by the store" or "can I cancel my order?" they are not.

use std::collections::{BTreeMap, HashSet};

use optout_core::Status;
use serde::Deserialize;
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// Keyword and button settings (the `[keywords]` table): additions to, or replacements of,
/// the built-in lists below.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keywords {
    /// Extra opt-out keywords by language tag: `{ en = ["HALT"], es = ["PARE"] }`.
    #[serde(default)]
    pub opt_out: BTreeMap<String, Vec<String>>,
    /// Extra opt-in keywords by language tag (matched exactly, never with filler words).
    #[serde(default)]
    pub opt_in: BTreeMap<String, Vec<String>>,
    /// Use only the keywords above, not the built-in lists.
    #[serde(default)]
    pub replace_defaults: bool,
    /// Button payload ids (template quick replies, interactive reply ids) that mean opt-out.
    #[serde(default)]
    pub opt_out_payloads: Vec<String>,
    /// Button payload ids that mean opt-in.
    #[serde(default)]
    pub opt_in_payloads: Vec<String>,
}

impl Keywords {
    /// Semantic problems as (key, problem) pairs: keywords that cannot match, and settings
    /// that contradict each other.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = Vec::new();
        let mut add = |k: &str, m: String| p.push((k.to_string(), m));
        for (key, lists) in [
            ("keywords.opt_out", &self.opt_out),
            ("keywords.opt_in", &self.opt_in),
        ] {
            for (lang, words) in lists {
                for w in words.iter().filter(|w| tokens(w).is_empty()) {
                    add(
                        &format!("{key}.{lang}"),
                        format!("keyword {w:?} has no letters or digits left after normalisation"),
                    );
                }
            }
        }
        if self.replace_defaults && self.opt_out.values().all(|w| w.is_empty()) {
            add("keywords.replace_defaults", "replaces the built-in lists but keywords.opt_out is empty: no typed STOP would be recognised".into());
        }
        // An opt-in word that is also an opt-out word would be read as an opt-out (opt-out
        // wins), which is surely not what the operator meant.
        let detector = Detector::new(self);
        for w in self.opt_in.values().flatten() {
            if detector
                .detect_text(w)
                .is_some_and(|d| d.status == Status::OptedOut)
            {
                add(
                    "keywords.opt_in",
                    format!("{w:?} is also an opt-out keyword"),
                );
            }
        }
        for id in &self.opt_in_payloads {
            if self.opt_out_payloads.contains(id) {
                add(
                    "keywords.opt_in_payloads",
                    format!("{id:?} is also listed in opt_out_payloads"),
                );
            }
        }
        p
    }
}

/// Default opt-out keywords by language.
///
/// Sources: the US FCC consent-revocation rules in force since April 2025 name "stop, quit, end,
/// revoke, opt out, cancel, unsubscribe" as words that must always be honoured; the
/// CTIA/carrier short-code keywords add STOP ALL, STOPALL, REMOVE and the OPT-OUT variants;
/// "STOP PROMOTIONS" is the label of Meta's marketing opt-out template button; the other
/// languages are the everyday equivalents businesses in those markets list in their templates
/// (ARRET/STOP for French carriers, STOPP for German, BAJA for Spanish, SAIR for Portuguese).
#[rustfmt::skip]
pub const DEFAULT_OPT_OUT: &[(&str, &[&str])] = &[
    ("en", &["STOP", "STOP ALL", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE",
             "OPT OUT", "OPT-OUT", "OPTOUT", "REMOVE", "STOP PROMOTIONS"]),
    ("es", &["BAJA", "DAR DE BAJA", "DARME DE BAJA", "PARAR", "ALTO", "DETENER", "CANCELAR",
             "NO MÁS", "DESUSCRIBIR", "DESUSCRIBIRME"]),
    ("pt", &["PARAR", "PARE", "SAIR", "CANCELAR", "DESCADASTRAR", "DESINSCREVER"]),
    ("fr", &["ARRÊT", "ARRETER", "STOPPER", "DÉSABONNER", "DÉSINSCRIRE", "ANNULER", "FIN"]),
    ("de", &["STOPP", "ABMELDEN", "BEENDEN", "KÜNDIGEN", "ABBESTELLEN", "AUSTRAGEN"]),
];

/// Default opt-in keywords: CTIA's START and UNSTOP plus plain "subscribe" words. YES is left
/// out on purpose: customers answer "yes" to every kind of question.
#[rustfmt::skip]
pub const DEFAULT_OPT_IN: &[(&str, &[&str])] = &[
    ("en", &["START", "UNSTOP", "SUBSCRIBE", "RESUBSCRIBE"]),
    ("es", &["ALTA", "SUSCRIBIRME"]),
    ("de", &["ANMELDEN"]),
];

/// Default keywords that are fine typed alone but too generic as a button label the
/// business wrote: a "Cancel" button usually cancels an appointment, a "Start" button starts
/// a flow. They are not matched against button titles or payloads.
#[rustfmt::skip]
pub const AMBIGUOUS_FOR_BUTTONS: &[&str] = &[
    "CANCEL", "END", "QUIT", "REMOVE", "CANCELAR", "SAIR", "ALTO", "ANNULER", "FIN", "BEENDEN",
    "KÜNDIGEN", "START", "ALTA",
];

/// Words allowed before a keyword ("please stop", "hola, baja").
#[rustfmt::skip]
const LEADING_FILLER: &[&str] = &[
    "PLEASE", "PLS", "PLZ", "OK", "OKAY", "HI", "HELLO", "HEY", "POR", "FAVOR", "PORFA", "HOLA",
    "OLA", "OI", "BITTE", "HALLO", "BONJOUR", "SVP", "STP", "S", "IL", "VOUS", "TE", "PLAIT",
];

/// Words allowed after a keyword ("stop please", "unsubscribe me", "stop sending me
/// messages", "no más mensajes, gracias"). None of them can turn a keyword into something
/// else: "stop by", "cancel my order", "end date" keep a non-filler word and do not match.
#[rustfmt::skip]
const TRAILING_FILLER: &[&str] = &[
    // en
    "PLEASE", "PLS", "PLZ", "NOW", "ME", "THANKS", "THANK", "YOU", "THANKYOU", "THX", "TY", "ALL",
    "THIS", "FROM", "THE", "LIST", "YOUR", "MESSAGES", "MESSAGING", "TEXTS", "TEXTING", "SENDING",
    "CONTACTING", "OK", "OKAY", "IMMEDIATELY",
    // es / pt
    "POR", "FAVOR", "PORFA", "GRACIAS", "MENSAJES", "YA", "TODO", "TODOS", "OBRIGADO", "OBRIGADA",
    "VALEU", "MENSAGENS", "JA",
    // fr
    "MERCI", "SVP", "STP", "S", "IL", "VOUS", "TE", "PLAIT",
    // de
    "BITTE", "DANKE", "MICH", "NACHRICHTEN", "SOFORT",
];

/// Anything longer is a sentence, not a keyword with filler; skipping it keeps the hot
/// path cheap on long messages.
const MAX_CHARS: usize = 160;

/// What a message or button expressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detection {
    pub status: Status,
    /// Language tag of the matched keyword (chooses the confirmation text).
    pub language: Option<String>,
    /// The keyword as matched (normalised), or `payload <id>` for a configured payload.
    pub matched: String,
}

#[derive(Clone, Debug)]
struct Entry {
    tokens: Vec<String>,
    language: String,
    for_buttons: bool,
}

/// A compiled keyword configuration.
#[derive(Clone, Debug)]
pub struct Detector {
    opt_out: Vec<Entry>,
    opt_in: Vec<Entry>,
    opt_out_payloads: HashSet<String>,
    opt_in_payloads: HashSet<String>,
    leading: HashSet<&'static str>,
    trailing: HashSet<String>,
}

impl Default for Detector {
    fn default() -> Self {
        Detector::new(&Keywords::default())
    }
}

impl Detector {
    pub fn new(cfg: &Keywords) -> Self {
        let ambiguous: HashSet<Vec<String>> =
            AMBIGUOUS_FOR_BUTTONS.iter().map(|w| tokens(w)).collect();
        let compile = |defaults: &[(&str, &[&str])], extra: &BTreeMap<String, Vec<String>>| {
            let mut out = Vec::new();
            if !cfg.replace_defaults {
                for (lang, words) in defaults {
                    for w in *words {
                        let t = tokens(w);
                        let for_buttons = !ambiguous.contains(&t);
                        out.push(Entry {
                            tokens: t,
                            language: lang.to_string(),
                            for_buttons,
                        });
                    }
                }
            }
            // Operators add words deliberately, so theirs count for buttons too.
            for (lang, words) in extra {
                for w in words {
                    let t = tokens(w);
                    if !t.is_empty() {
                        out.push(Entry {
                            tokens: t,
                            language: lang.clone(),
                            for_buttons: true,
                        });
                    }
                }
            }
            // Longest first, so "STOP ALL" is reported rather than "STOP" + filler "ALL".
            out.sort_by_key(|e| std::cmp::Reverse(e.tokens.len()));
            out
        };
        let opt_out = compile(DEFAULT_OPT_OUT, &cfg.opt_out);
        let opt_in = compile(DEFAULT_OPT_IN, &cfg.opt_in);
        // A repeated keyword ("STOP STOP", "stop unsubscribe") is still an opt-out.
        let mut trailing: HashSet<String> = TRAILING_FILLER.iter().map(|s| s.to_string()).collect();
        trailing.extend(
            opt_out
                .iter()
                .filter(|e| e.tokens.len() == 1)
                .map(|e| e.tokens[0].clone()),
        );
        Detector {
            opt_out,
            opt_in,
            opt_out_payloads: cfg
                .opt_out_payloads
                .iter()
                .map(|s| s.trim().to_string())
                .collect(),
            opt_in_payloads: cfg
                .opt_in_payloads
                .iter()
                .map(|s| s.trim().to_string())
                .collect(),
            leading: LEADING_FILLER.iter().copied().collect(),
            trailing,
        }
    }

    /// A typed message: opt-out with filler tolerated, opt-in only as an exact match.
    pub fn detect_text(&self, text: &str) -> Option<Detection> {
        if text.chars().count() > MAX_CHARS {
            return None;
        }
        let t = tokens(text);
        if t.is_empty() {
            return None;
        }
        self.match_opt_out(&t, false)
            .or_else(|| self.match_opt_in(&t, false))
    }

    /// A tapped button: the payload id against the configured ids first, then payload and
    /// title against the keywords (without the generic ones, see [`AMBIGUOUS_FOR_BUTTONS`]).
    /// Any opt-out reading wins over an opt-in one.
    pub fn detect_button(&self, payload: Option<&str>, title: Option<&str>) -> Option<Detection> {
        let payload = payload.map(str::trim).filter(|p| !p.is_empty());
        let texts: Vec<Vec<String>> = [payload, title]
            .into_iter()
            .flatten()
            .filter(|s| s.chars().count() <= MAX_CHARS)
            .map(tokens)
            .filter(|t| !t.is_empty())
            .collect();
        if let Some(p) = payload.filter(|p| self.opt_out_payloads.contains(*p)) {
            return Some(payload_detection(Status::OptedOut, p));
        }
        if let Some(d) = texts.iter().find_map(|t| self.match_opt_out(t, true)) {
            return Some(d);
        }
        if let Some(p) = payload.filter(|p| self.opt_in_payloads.contains(*p)) {
            return Some(payload_detection(Status::OptedIn, p));
        }
        texts.iter().find_map(|t| self.match_opt_in(t, true))
    }

    fn match_opt_out(&self, t: &[String], button: bool) -> Option<Detection> {
        let start = t
            .iter()
            .take_while(|w| self.leading.contains(w.as_str()))
            .count();
        // Try every number of skipped filler words, so a configured keyword that starts
        // with a filler word ("PLEASE STOP") still matches.
        (0..=start).find_map(|skip| {
            let rest = &t[skip..];
            self.opt_out
                .iter()
                .filter(|e| !button || e.for_buttons)
                .find_map(|e| {
                    let n = e.tokens.len();
                    (rest.len() >= n
                        && rest[..n] == e.tokens[..]
                        && rest[n..].iter().all(|w| self.trailing.contains(w)))
                    .then(|| detection(Status::OptedOut, e))
                })
        })
    }

    fn match_opt_in(&self, t: &[String], button: bool) -> Option<Detection> {
        self.opt_in
            .iter()
            .filter(|e| !button || e.for_buttons)
            .find(|e| e.tokens == t)
            .map(|e| detection(Status::OptedIn, e))
    }
}

fn detection(status: Status, e: &Entry) -> Detection {
    Detection {
        status,
        language: Some(e.language.clone()),
        matched: e.tokens.join(" "),
    }
}

fn payload_detection(status: Status, payload: &str) -> Detection {
    Detection {
        status,
        language: None,
        matched: format!("payload {payload}"),
    }
}

/// Normalised words of a text: compatibility-decomposed (full-width and ligature forms become
/// plain letters), combining marks removed (ARRÊT = ARRET), upper-cased, split on anything
/// that is not a letter or digit (punctuation, emoji, spaces). Invisible format characters
/// are dropped rather than treated as separators, so "S\u{200B}TOP" is still STOP.
pub fn tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in s.nfkd() {
        if is_combining_mark(c)
            || matches!(
                c,
                '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}'
            )
        {
            continue;
        }
        if c.is_alphanumeric() {
            cur.extend(c.to_uppercase());
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::{OptedIn as In, OptedOut as Out};

    #[test]
    fn normalises_case_marks_width_and_punctuation() {
        assert_eq!(tokens("  Arrêt!! "), vec!["ARRET"]);
        assert_eq!(tokens("ＳＴＯＰ"), vec!["STOP"]);
        assert_eq!(tokens("🛑stop🛑"), vec!["STOP"]);
        assert_eq!(tokens("opt-out."), vec!["OPT", "OUT"]);
        assert_eq!(tokens("S\u{200B}TOP"), vec!["STOP"]);
        assert_eq!(tokens("KÜNDIGEN"), vec!["KUNDIGEN"]);
        assert!(tokens("👍 …").is_empty());
    }

    /// (message, expected status, expected language).
    const TABLE: &[(&str, Option<Status>, Option<&str>)] = &[
        // FCC words, bare and decorated
        ("STOP", Some(Out), Some("en")),
        ("stop", Some(Out), Some("en")),
        ("Stop.", Some(Out), Some("en")),
        ("  STOP  ", Some(Out), Some("en")),
        ("STOP!!!", Some(Out), Some("en")),
        ("🛑 STOP 🛑", Some(Out), Some("en")),
        ("ＳＴＯＰ", Some(Out), Some("en")),
        ("S\u{200B}TOP", Some(Out), Some("en")),
        ("quit", Some(Out), Some("en")),
        ("End", Some(Out), Some("en")),
        ("REVOKE", Some(Out), Some("en")),
        ("opt out", Some(Out), Some("en")),
        ("Opt-Out", Some(Out), Some("en")),
        ("OPTOUT", Some(Out), Some("en")),
        ("cancel", Some(Out), Some("en")),
        ("Unsubscribe", Some(Out), Some("en")),
        ("unsubscribe me!", Some(Out), Some("en")),
        ("Unsubscribe me please", Some(Out), Some("en")),
        ("STOP ALL", Some(Out), Some("en")),
        ("stopall", Some(Out), Some("en")),
        ("remove", Some(Out), Some("en")),
        ("remove me", Some(Out), Some("en")),
        ("Remove me from your list", Some(Out), Some("en")),
        ("stop please", Some(Out), Some("en")),
        ("please stop", Some(Out), Some("en")),
        ("Please, STOP.", Some(Out), Some("en")),
        ("STOP thanks", Some(Out), Some("en")),
        ("stop, thank you", Some(Out), Some("en")),
        ("Stop sending me messages", Some(Out), Some("en")),
        ("stop now", Some(Out), Some("en")),
        ("STOP STOP STOP", Some(Out), Some("en")),
        ("stop unsubscribe", Some(Out), Some("en")),
        ("ok stop", Some(Out), Some("en")),
        ("hi, stop", Some(Out), Some("en")),
        ("Stop promotions", Some(Out), Some("en")),
        ("stop 🙏", Some(Out), Some("en")),
        ("\tUNSUBSCRIBE\n", Some(Out), Some("en")),
        // Spanish
        ("BAJA", Some(Out), Some("es")),
        ("baja por favor", Some(Out), Some("es")),
        ("Por favor, baja", Some(Out), Some("es")),
        ("dar de baja", Some(Out), Some("es")),
        ("Darme de baja, gracias", Some(Out), Some("es")),
        ("parar", Some(Out), Some("es")),
        ("ALTO", Some(Out), Some("es")),
        ("detener", Some(Out), Some("es")),
        ("Cancelar", Some(Out), Some("es")),
        ("No más", Some(Out), Some("es")),
        ("NO MAS", Some(Out), Some("es")),
        ("no más mensajes", Some(Out), Some("es")),
        ("desuscribirme", Some(Out), Some("es")),
        // Portuguese (PARAR and CANCELAR are listed under Spanish first)
        ("SAIR", Some(Out), Some("pt")),
        ("sair, obrigado", Some(Out), Some("pt")),
        ("Descadastrar", Some(Out), Some("pt")),
        ("pare", Some(Out), Some("pt")),
        ("parar por favor", Some(Out), Some("es")),
        ("desinscrever", Some(Out), Some("pt")),
        // French
        ("ARRÊT", Some(Out), Some("fr")),
        ("arret", Some(Out), Some("fr")),
        ("Arrêter merci", Some(Out), Some("fr")),
        ("stopper", Some(Out), Some("fr")),
        ("Désabonner", Some(Out), Some("fr")),
        ("désinscrire s'il vous plaît", Some(Out), Some("fr")),
        ("ANNULER", Some(Out), Some("fr")),
        // German
        ("STOPP", Some(Out), Some("de")),
        ("stopp bitte", Some(Out), Some("de")),
        ("Bitte abmelden", Some(Out), Some("de")),
        ("ABMELDEN", Some(Out), Some("de")),
        ("beenden", Some(Out), Some("de")),
        ("Kündigen", Some(Out), Some("de")),
        ("kundigen", Some(Out), Some("de")),
        ("abbestellen danke", Some(Out), Some("de")),
        // Opt-ins: exact only
        ("START", Some(In), Some("en")),
        ("start", Some(In), Some("en")),
        ("Start!", Some(In), Some("en")),
        ("UNSTOP", Some(In), Some("en")),
        ("subscribe", Some(In), Some("en")),
        ("Resubscribe", Some(In), Some("en")),
        ("ALTA", Some(In), Some("es")),
        ("anmelden", Some(In), Some("de")),
        ("start please", None, None),
        ("START NOW", None, None),
        ("yes", None, None),
        ("YES", None, None),
        ("Sí", None, None),
        ("ok", None, None),
        ("start date?", None, None),
        ("When does the course start?", None, None),
        ("subscribe me to the newsletter", None, None),
        ("I want to subscribe", None, None),
        // Look-alikes: never an opt-out
        ("don't stop", None, None),
        ("Don't stop!", None, None),
        ("stop by the store", None, None),
        ("I'll stop by tomorrow", None, None),
        ("can I cancel my order?", None, None),
        ("cancel my order", None, None),
        ("cancel order 1234", None, None),
        ("the end", None, None),
        ("The End", None, None),
        ("end date?", None, None),
        ("remove the item from my cart", None, None),
        ("remove item", None, None),
        ("quitting smoking was hard", None, None),
        ("unstoppable", None, None),
        ("stopwatch", None, None),
        ("STOP sign is broken", None, None),
        ("bus stop", None, None),
        ("where is the bus stop", None, None),
        ("What time do you stop serving?", None, None),
        (
            "How do I unsubscribe from the newsletter but keep orders?",
            None,
            None,
        ),
        ("baja California", None, None),
        ("alto voltaje", None, None),
        ("sair de casa", None, None),
        ("fin de semana", None, None),
        ("hello", None, None),
        ("Hi there, where is my parcel?", None, None),
        ("👍", None, None),
        ("", None, None),
        ("   ", None, None),
        ("!!!", None, None),
        ("S T O P", None, None),
        ("Thanks", None, None),
        ("please", None, None),
    ];

    #[test]
    fn detection_table() {
        assert!(TABLE.len() >= 100, "table has {} rows", TABLE.len());
        let d = Detector::default();
        let mut failures = Vec::new();
        for (text, status, lang) in TABLE {
            let got = d.detect_text(text);
            let got_pair = (
                got.as_ref().map(|g| g.status),
                got.as_ref().and_then(|g| g.language.as_deref()),
            );
            if got_pair != (*status, *lang) {
                failures.push(format!(
                    "{text:?}: expected {status:?}/{lang:?}, got {got:?}"
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn long_messages_are_not_keywords() {
        let d = Detector::default();
        let long = format!("stop {}", "please ".repeat(40));
        assert_eq!(d.detect_text(&long), None);
        assert!(d.detect_text("stop please please please").is_some());
    }

    #[test]
    fn buttons_use_payload_ids_and_unambiguous_titles() {
        let d = Detector::new(&Keywords {
            opt_out_payloads: vec!["OPT_OUT_MKT".into()],
            opt_in_payloads: vec!["OPT_IN_MKT".into()],
            ..Keywords::default()
        });
        let out = |p, t| d.detect_button(p, t).map(|x| x.status);
        assert_eq!(out(Some("Unsubscribe"), Some("Unsubscribe")), Some(Out));
        assert_eq!(out(Some("x-1"), Some("Stop promotions")), Some(Out));
        assert_eq!(out(Some("OPT_OUT_MKT"), Some("Not now")), Some(Out));
        assert_eq!(out(Some("OPT_IN_MKT"), Some("Yes please")), Some(In));
        assert_eq!(out(Some("x"), Some("Unstop")), Some(In));
        // Generic labels the business wrote for something else.
        assert_eq!(out(Some("cancel-button"), Some("Cancel")), None);
        assert_eq!(out(None, Some("Start")), None);
        assert_eq!(out(None, Some("End")), None);
        assert_eq!(out(Some("No-Button-Payload"), Some("No")), None);
        // Opt-out wins when the two disagree.
        assert_eq!(out(Some("OPT_IN_MKT"), Some("Stop")), Some(Out));
        // Payload ids are exact, not normalised.
        assert_eq!(out(Some("opt_out_mkt"), Some("x")), None);
        assert_eq!(
            d.detect_button(Some("OPT_OUT_MKT"), None).unwrap().language,
            None
        );
    }

    #[test]
    fn configured_words_extend_or_replace_the_defaults() {
        let extra = Keywords {
            opt_out: BTreeMap::from([("it".to_string(), vec!["BASTA".to_string()])]),
            opt_in: BTreeMap::from([("it".to_string(), vec!["RIPRENDI".to_string()])]),
            ..Keywords::default()
        };
        let d = Detector::new(&extra);
        assert_eq!(
            d.detect_text("basta grazie").map(|x| x.status),
            None,
            "GRAZIE is not filler"
        );
        assert_eq!(
            d.detect_text("Basta!").unwrap().language.as_deref(),
            Some("it")
        );
        assert_eq!(d.detect_text("riprendi").unwrap().status, In);
        assert_eq!(d.detect_button(None, Some("Basta")).unwrap().status, Out);
        assert!(d.detect_text("STOP").is_some());
        let only = Detector::new(&Keywords {
            replace_defaults: true,
            ..extra
        });
        assert_eq!(only.detect_text("STOP"), None);
        assert_eq!(only.detect_text("START"), None);
        assert!(only.detect_text("basta").is_some());
    }
}
