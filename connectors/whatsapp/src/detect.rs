//! Keyword and button detection: does a customer's message say "opt me out" or "opt me back
//! in", and for which scope? Pure and configurable; the default lists live here, in one
//! place (`KEYWORDS.md` at the repository root documents them with their sources).
//!
//! The asymmetry is deliberate. A missed opt-out is a compliance failure and a false one
//! only costs a message, so opt-out matching is tolerant: case, punctuation, emoji,
//! diacritics and full-width forms are ignored, and the keyword may come with polite
//! filler ("stop please", "Unsubscribe me!", "bitte abmelden") or a plain lead-in ("I want
//! to opt out", "quiero darme de baja"). A false opt-in would message someone who said
//! stop, so opt-in needs the whole message to be exactly the keyword ("START", "start!"),
//! never "start date?".
//!
//! Look-alikes stay silent because every word around the keyword must be filler: in
//! "don't stop", "stop by the store" or "can I cancel my order?" they are not. A message
//! that holds a strong revocation word ("stop", "unsubscribe", "abmelden") but is not
//! clearly an opt-out ("stop sending me the catalogue, I only want orders", "can you
//! stop?") is a *possible* opt-out ([`Detector::possible_opt_out`]): never applied either
//! way, recorded for an operator, and answered at most once with a clarification.
//!
//! Each keyword and payload may carry a scope: Meta's marketing opt-out button ("Stop
//! promotions" and its translations) stops `marketing` only; STOP-type words leave the
//! scope to the policy's map by signal (`all` by default). `keywords.scopes` and
//! `keywords.payload_scopes` change either.

use std::collections::{BTreeMap, HashMap, HashSet};

use optout_core::{Scope, Status};
use serde::Deserialize;
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// Keyword and button settings (the `[keywords]` table): additions to, or replacements of,
/// the built-in lists below, and the scope of each keyword or payload.
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
    /// The scope (`all` or `marketing`) of a keyword, built-in or configured, opt-out or
    /// opt-in, written as in the lists: `{ "STOP PROMOTIONS" = "all", HALT = "marketing" }`.
    /// A keyword not named keeps its built-in scope, or the policy's scope for its signal.
    #[serde(default)]
    pub scopes: BTreeMap<String, String>,
    /// The scope of a configured payload id: `{ OPT_OUT_MKT = "marketing" }`.
    #[serde(default)]
    pub payload_scopes: BTreeMap<String, String>,
}

/// A scope's configuration name, exactly as written (`all`, `marketing`).
pub fn parse_scope(name: &str) -> Option<Scope> {
    Scope::EVERY.into_iter().find(|s| s.as_str() == name)
}

type Problems = Vec<(String, String)>;

impl Keywords {
    /// Semantic problems as (key, problem) pairs: keywords that cannot match, words or
    /// payloads listed twice, unknown scopes, scopes for words that are no keyword, and
    /// settings that contradict each other.
    pub fn problems(&self) -> Problems {
        let mut p = self.list_problems();
        p.extend(self.scope_problems());
        if self.replace_defaults && self.opt_out.values().all(|w| w.is_empty()) {
            p.push(("keywords.replace_defaults".into(), "replaces the built-in lists but keywords.opt_out is empty: no typed STOP would be recognised".into()));
        }
        // An opt-in word that is also an opt-out word would be read as an opt-out (opt-out
        // wins), which is surely not what the operator meant.
        let detector = Detector::new(self);
        for w in self.opt_in.values().flatten() {
            if detector
                .detect_text(w)
                .is_some_and(|d| d.status == Status::OptedOut)
            {
                p.push((
                    "keywords.opt_in".into(),
                    format!("{w:?} is also an opt-out keyword"),
                ));
            }
        }
        for id in &self.opt_in_payloads {
            if self.opt_out_payloads.contains(id) {
                p.push((
                    "keywords.opt_in_payloads".into(),
                    format!("{id:?} is also listed in opt_out_payloads"),
                ));
            }
        }
        p
    }

    /// Empty and repeated words and payload ids in the configured lists.
    fn list_problems(&self) -> Problems {
        let mut p: Problems = Vec::new();
        for (key, lists) in [
            ("keywords.opt_out", &self.opt_out),
            ("keywords.opt_in", &self.opt_in),
        ] {
            let mut seen: HashMap<Vec<String>, String> = HashMap::new();
            for (lang, words) in lists {
                for w in words {
                    let t = tokens(w);
                    let at = format!("{key}.{lang}");
                    if t.is_empty() {
                        let m = format!(
                            "keyword {w:?} has no letters or digits left after normalisation"
                        );
                        p.push((at, m));
                    } else if let Some(first) = seen.insert(t, at.clone()) {
                        p.push((at, format!("{w:?} is listed twice (also in {first})")));
                    }
                }
            }
        }
        for (key, ids) in [
            ("keywords.opt_out_payloads", &self.opt_out_payloads),
            ("keywords.opt_in_payloads", &self.opt_in_payloads),
        ] {
            let mut seen = HashSet::new();
            for id in ids {
                if id.trim().is_empty() {
                    p.push((key.into(), "an empty payload id matches nothing".into()));
                } else if !seen.insert(id.trim()) {
                    p.push((key.into(), format!("{id:?} is listed twice")));
                }
            }
        }
        p
    }

    /// `keywords.scopes` and `keywords.payload_scopes`: known scope names, for words and ids
    /// that exist, each named once.
    fn scope_problems(&self) -> Problems {
        let mut p: Problems = Vec::new();
        let unknown = |v: &str| format!("unknown scope {v:?}: use \"all\" or \"marketing\"");
        let known = Detector::new(&Keywords {
            scopes: BTreeMap::new(),
            ..self.clone()
        });
        let mut seen: HashMap<Vec<String>, &str> = HashMap::new();
        for (word, scope) in &self.scopes {
            let key = format!("keywords.scopes.{word}");
            let t = tokens(word);
            if parse_scope(scope).is_none() {
                p.push((key.clone(), unknown(scope)));
            }
            if t.is_empty() {
                p.push((
                    key,
                    "has no letters or digits left after normalisation".into(),
                ));
            } else if let Some(first) = seen.insert(t.clone(), word) {
                p.push((key, format!("the same keyword as {first:?}")));
            } else if !known.has_keyword(&t) {
                p.push((key, format!("{word:?} is not an opt-out or opt-in keyword: add it to keywords.opt_out or keywords.opt_in first")));
            }
        }
        for (id, scope) in &self.payload_scopes {
            let key = format!("keywords.payload_scopes.{id}");
            if parse_scope(scope).is_none() {
                p.push((key.clone(), unknown(scope)));
            }
            let listed = self.opt_out_payloads.iter().chain(&self.opt_in_payloads);
            if !listed.map(|x| x.trim()).any(|x| x == id.trim()) {
                p.push((key, format!("{id:?} is not listed in keywords.opt_out_payloads or keywords.opt_in_payloads")));
            }
        }
        p
    }
}

/// Default opt-out keywords and phrases by language; their scope is the policy's scope for
/// the signal (`all` by default) unless [`DEFAULT_SCOPES`] names them.
///
/// Sources (details in `KEYWORDS.md`): the US FCC consent-revocation rules in force since
/// April 2025 name "stop, quit, end, revoke, opt out, cancel, unsubscribe" as words that must
/// always be honoured, and any reasonable means of revoking, hence the plain sentences
/// ("opt me out", "no more messages"); the CTIA/carrier short-code keywords add STOP ALL,
/// STOPALL, REMOVE and the OPT-OUT variants; the other languages are the everyday
/// equivalents businesses in those markets list in their templates (ARRET/STOP for French
/// carriers, STOPP for German, BAJA for Spanish, SAIR for Portuguese, 配信停止 for Japanese).
#[rustfmt::skip]
pub const DEFAULT_OPT_OUT: &[(&str, &[&str])] = &[
    ("en", &["STOP", "STOP ALL", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE",
             "OPT OUT", "OPT-OUT", "OPTOUT", "REMOVE", "OPT ME OUT", "STOP IT", "NO MORE",
             "CANCEL SUBSCRIPTION", "CANCEL MY SUBSCRIPTION", "TAKE ME OFF", "LEAVE ME ALONE",
             "DO NOT CONTACT ME", "DON'T CONTACT ME", "DONT CONTACT ME", "DO NOT MESSAGE ME",
             "DON'T MESSAGE ME", "DONT MESSAGE ME", "DO NOT TEXT ME", "DON'T TEXT ME"]),
    ("es", &["BAJA", "DAR DE BAJA", "DARME DE BAJA", "PARAR", "ALTO", "DETENER", "CANCELAR",
             "NO MÁS", "DESUSCRIBIR", "DESUSCRIBIRME", "CANCELAR SUSCRIPCIÓN",
             "CANCELAR MI SUSCRIPCIÓN", "NO QUIERO RECIBIR", "DEJEN DE ESCRIBIRME",
             "DEJEN DE ENVIARME"]),
    ("pt", &["PARAR", "PARE", "SAIR", "CANCELAR", "DESCADASTRAR", "DESINSCREVER",
             "CANCELAR INSCRIÇÃO", "NÃO QUERO RECEBER", "NÃO QUERO MAIS RECEBER",
             "PAREM DE ME ENVIAR", "PARE DE ME ENVIAR"]),
    ("fr", &["ARRÊT", "ARRETER", "ARRÊTEZ", "STOPPER", "DÉSABONNER", "DÉSINSCRIRE", "ANNULER",
             "FIN"]),
    ("de", &["STOPP", "ABMELDEN", "BEENDEN", "KÜNDIGEN", "ABBESTELLEN", "AUSTRAGEN",
             "KEINE NACHRICHTEN MEHR"]),
    ("ja", &["停止", "配信停止", "停止してください", "配信停止してください", "配信解除"]),
];

/// Default opt-outs of marketing only: the label of Meta's marketing opt-out template button
/// in the languages sourced, and the same words typed (see `KEYWORDS.md`).
#[rustfmt::skip]
pub const DEFAULT_MARKETING_OPT_OUT: &[(&str, &[&str])] = &[
    ("en", &["STOP PROMOTIONS", "NO MORE PROMOTIONS"]),
    ("es", &["DETENER PROMOCIONES", "NO MÁS PROMOCIONES"]),
    ("pt", &["PARAR PROMOÇÕES"]),
    ("de", &["KEINE WERBUNG MEHR"]),
];

/// Built-in keywords whose scope is fixed rather than left to the policy's map: whoever
/// writes STOP ALL means every message, even where plain keywords are set to `marketing`.
pub const DEFAULT_SCOPES: &[(&str, Scope)] = &[("STOP ALL", Scope::All), ("STOPALL", Scope::All)];

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
    "KÜNDIGEN", "START", "ALTA", "NO MORE", "NO MÁS",
];

/// Words of a strong revocation: a message holding one that is not clearly an opt-out is a
/// possible one. Generic words (cancel, end, remove, baja) are left out: "cancel my order"
/// is no request to stop messages.
#[rustfmt::skip]
const REVOCATION_WORDS: &[(&str, &[&str])] = &[
    ("en", &["STOP", "STOPALL", "UNSUBSCRIBE", "OPT OUT", "OPTOUT", "REVOKE"]),
    ("es", &["DESUSCRIBIR", "DESUSCRIBIRME", "DARME DE BAJA", "DAR DE BAJA"]),
    ("pt", &["DESCADASTRAR", "DESINSCREVER"]),
    ("fr", &["ARRET", "ARRETER", "ARRETEZ", "STOPPER", "DESABONNER", "DESINSCRIRE"]),
    ("de", &["STOPP", "ABMELDEN", "ABBESTELLEN", "AUSTRAGEN"]),
    ("ja", &["停止", "配信解除"]),
];

/// Words right before a revocation word that make it something else: a negation ("don't
/// stop", "can't stop laughing", "nicht abmelden") or a noun ("bus stop", "non-stop").
#[rustfmt::skip]
const BENIGN_BEFORE: &[&str] = &[
    "T", "NOT", "NEVER", "DONT", "CANT", "WONT", "NAO", "NICHT", "NIE", "NE", "BUS", "NON",
    "FULL", "PIT", "TRUCK",
];

/// Words right after a revocation word that make it something else ("stop by the store").
const BENIGN_AFTER: &[&str] = &["BY", "SIGN", "WATCH", "OVER", "SMOKING", "LAUGHING"];

/// Polite words allowed before a keyword ("please stop", "hola, baja"), in buttons too.
#[rustfmt::skip]
const LEADING_FILLER: &[&str] = &[
    "PLEASE", "PLS", "PLZ", "OK", "OKAY", "HI", "HELLO", "HEY", "POR", "FAVOR", "PORFA", "HOLA",
    "OLA", "OI", "BITTE", "HALLO", "BONJOUR", "SVP", "STP", "S", "IL", "VOUS", "TE", "PLAIT",
];

/// A typed message's lead-in to a revocation ("I want to opt out", "can you stop",
/// "quiero darme de baja", "je veux me désabonner", "ich möchte mich abmelden"). Typed text
/// only; in a question ("can I cancel?") a lead-in makes the message a possible opt-out,
/// not a clear one.
#[rustfmt::skip]
const LEAD_IN: &[&str] = &[
    "I", "WANT", "TO", "WOULD", "LIKE", "D", "WISH", "CAN", "COULD", "YOU", "KINDLY", "JUST",
    "NEED", "WANNA", "QUIERO", "ME", "GUSTARIA", "PUEDEN", "PUEDES", "QUERO", "GOSTARIA",
    "DE", "PODE", "PODEM", "JE", "VEUX", "VOUDRAIS", "ICH", "MOCHTE", "WILL", "MICH",
];

/// Words allowed after a keyword ("stop please", "unsubscribe me", "stop sending me
/// messages", "no más mensajes, gracias"). None of them can turn a keyword into something
/// else: "stop by", "cancel my order", "end date" keep a non-filler word and do not match.
#[rustfmt::skip]
const TRAILING_FILLER: &[&str] = &[
    // en
    "PLEASE", "PLS", "PLZ", "NOW", "ME", "THANKS", "THANK", "YOU", "THANKYOU", "THX", "TY", "ALL",
    "THIS", "FROM", "THE", "LIST", "YOUR", "MESSAGES", "MESSAGING", "TEXTS", "TEXTING", "SENDING",
    "CONTACTING", "RECEIVING", "GETTING", "OK", "OKAY", "IMMEDIATELY", "OF", "ANYMORE", "THESE",
    // es / pt
    "POR", "FAVOR", "PORFA", "GRACIAS", "MENSAJES", "YA", "TODO", "TODOS", "OBRIGADO", "OBRIGADA",
    "VALEU", "MENSAGENS", "JA", "MAS", "MAIS", "MENSAGEM",
    // fr
    "MERCI", "SVP", "STP", "S", "IL", "VOUS", "TE", "PLAIT", "MOI",
    // de
    "BITTE", "DANKE", "MICH", "NACHRICHTEN", "SOFORT",
];

/// Anything longer is a sentence, not a keyword with filler; skipping it keeps the hot
/// path cheap on long messages.
const MAX_CHARS: usize = 160;

/// The longest message read for a possible opt-out.
const MAX_POSSIBLE_CHARS: usize = 1000;

/// What a message or button expressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detection {
    pub status: Status,
    /// Language tag of the matched keyword (chooses the confirmation text).
    pub language: Option<String>,
    /// The keyword as matched (normalised), or `payload <id>` for a configured payload.
    pub matched: String,
    /// The scope the keyword or payload is configured for; `None` leaves it to the
    /// policy's scope for the signal.
    pub scope: Option<Scope>,
}

#[derive(Clone, Debug)]
struct Entry {
    tokens: Vec<String>,
    language: String,
    for_buttons: bool,
    scope: Option<Scope>,
}

/// A compiled keyword configuration.
#[derive(Clone, Debug)]
pub struct Detector {
    opt_out: Vec<Entry>,
    opt_in: Vec<Entry>,
    /// Payload id → its configured scope.
    opt_out_payloads: HashMap<String, Option<Scope>>,
    opt_in_payloads: HashMap<String, Option<Scope>>,
    leading: HashSet<&'static str>,
    lead_in: HashSet<&'static str>,
    trailing: HashSet<String>,
    /// Strong revocation words (tokens) by language, for possible opt-outs.
    revocation: Vec<(Vec<String>, String)>,
}

impl Default for Detector {
    fn default() -> Self {
        Detector::new(&Keywords::default())
    }
}

/// Words by language tag, as the built-in lists are written.
type WordLists = &'static [(&'static str, &'static [&'static str])];

/// Compiles built-in (unless replaced) and configured words into entries, longest first
/// (so "STOP ALL" is reported rather than "STOP" + filler "ALL").
fn compile(
    defaults: &[(WordLists, Option<Scope>)],
    extra: &BTreeMap<String, Vec<String>>,
    replace_defaults: bool,
) -> Vec<Entry> {
    let ambiguous: HashSet<Vec<String>> = AMBIGUOUS_FOR_BUTTONS.iter().map(|w| tokens(w)).collect();
    let mut out = Vec::new();
    for (lists, scope) in defaults.iter().filter(|_| !replace_defaults) {
        for (lang, words) in lists.iter() {
            for w in *words {
                let t = tokens(w);
                let fixed = DEFAULT_SCOPES.iter().find(|(d, _)| tokens(d) == t);
                out.push(Entry {
                    for_buttons: !ambiguous.contains(&t),
                    tokens: t,
                    language: lang.to_string(),
                    scope: fixed.map(|(_, s)| *s).or(*scope),
                });
            }
        }
    }
    // Operators add words deliberately, so theirs count for buttons too.
    for (lang, words) in extra {
        for t in words.iter().map(|w| tokens(w)).filter(|t| !t.is_empty()) {
            out.push(Entry {
                tokens: t,
                language: lang.clone(),
                for_buttons: true,
                scope: None,
            });
        }
    }
    out.sort_by_key(|e| std::cmp::Reverse(e.tokens.len()));
    out
}

impl Detector {
    pub fn new(cfg: &Keywords) -> Self {
        let mut opt_out = compile(
            &[
                (DEFAULT_OPT_OUT, None),
                (DEFAULT_MARKETING_OPT_OUT, Some(Scope::Marketing)),
            ],
            &cfg.opt_out,
            cfg.replace_defaults,
        );
        let mut opt_in = compile(&[(DEFAULT_OPT_IN, None)], &cfg.opt_in, cfg.replace_defaults);
        // Configured scopes override built-in ones; unknown names are check-config's to report.
        for (word, scope) in &cfg.scopes {
            let (t, scope) = (tokens(word), parse_scope(scope));
            for e in opt_out.iter_mut().chain(opt_in.iter_mut()) {
                if e.tokens == t && scope.is_some() {
                    e.scope = scope;
                }
            }
        }
        // A repeated keyword ("STOP STOP", "stop unsubscribe") is still an opt-out.
        let mut trailing: HashSet<String> = TRAILING_FILLER.iter().map(|s| s.to_string()).collect();
        trailing.extend(
            (opt_out.iter())
                .filter(|e| e.tokens.len() == 1)
                .map(|e| e.tokens[0].clone()),
        );
        let payloads = |ids: &[String]| -> HashMap<String, Option<Scope>> {
            ids.iter()
                .map(|s| s.trim().to_string())
                .map(|id| {
                    let scope = (cfg.payload_scopes.iter())
                        .find(|(k, _)| k.trim() == id)
                        .and_then(|(_, v)| parse_scope(v));
                    (id, scope)
                })
                .collect()
        };
        Detector {
            revocation: revocation_words(cfg),
            opt_out,
            opt_in,
            opt_out_payloads: payloads(&cfg.opt_out_payloads),
            opt_in_payloads: payloads(&cfg.opt_in_payloads),
            leading: LEADING_FILLER.iter().copied().collect(),
            lead_in: LEAD_IN.iter().copied().collect(),
            trailing,
        }
    }

    /// Whether `t` (normalised words) is one of the opt-out or opt-in keywords.
    fn has_keyword(&self, t: &[String]) -> bool {
        (self.opt_out.iter().chain(&self.opt_in)).any(|e| e.tokens == t)
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
        match self.match_opt_out(&t, false) {
            // "Can I cancel?", "could you stop?": a question is not clearly a revocation.
            Some((_, true)) if text.contains(['?', '¿']) => None,
            Some((d, _)) => Some(d),
            None => self.match_opt_in(&t, false),
        }
    }

    /// A typed message that holds a strong revocation word but is not clearly an opt-out
    /// (call it when [`Detector::detect_text`] found nothing): the word's language and the
    /// word. Negated or idiomatic uses ("don't stop", "stop by", "bus stop") are not.
    pub fn possible_opt_out(&self, text: &str) -> Option<Detection> {
        if text.chars().count() > MAX_POSSIBLE_CHARS {
            return None;
        }
        let t = tokens(text);
        for i in 0..t.len() {
            for (word, lang) in &self.revocation {
                let n = word.len();
                let hit = if n == 1 && !word[0].is_ascii() {
                    // Japanese has no spaces: the word may sit inside a longer run.
                    t[i].contains(word[0].as_str())
                } else {
                    t.len() >= i + n && t[i..i + n] == word[..]
                };
                let benign = (i > 0 && BENIGN_BEFORE.contains(&t[i - 1].as_str()))
                    || t.get(i + n)
                        .is_some_and(|w| BENIGN_AFTER.contains(&w.as_str()));
                if hit && !benign {
                    return Some(Detection {
                        status: Status::OptedOut,
                        language: Some(lang.clone()),
                        matched: word.join(" "),
                        scope: None,
                    });
                }
            }
        }
        None
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
        if let Some((p, scope)) = payload.and_then(|p| self.opt_out_payloads.get_key_value(p)) {
            return Some(payload_detection(Status::OptedOut, p, *scope));
        }
        if let Some((d, _)) = texts.iter().find_map(|t| self.match_opt_out(t, true)) {
            return Some(d);
        }
        if let Some((p, scope)) = payload.and_then(|p| self.opt_in_payloads.get_key_value(p)) {
            return Some(payload_detection(Status::OptedIn, p, *scope));
        }
        texts.iter().find_map(|t| self.match_opt_in(t, true))
    }

    /// An opt-out keyword with filler around it, and whether a typed lead-in ("I want to")
    /// was needed to reach it.
    fn match_opt_out(&self, t: &[String], button: bool) -> Option<(Detection, bool)> {
        let polite = t
            .iter()
            .take_while(|w| self.leading.contains(w.as_str()))
            .count();
        let start = if button {
            polite
        } else {
            t.iter()
                .take_while(|w| {
                    self.leading.contains(w.as_str()) || self.lead_in.contains(w.as_str())
                })
                .count()
        };
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
                    .then(|| (detection(Status::OptedOut, e), skip > polite))
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

/// The strong revocation words: the built-in ones (unless replaced) and the operator's
/// single-word opt-out keywords.
fn revocation_words(cfg: &Keywords) -> Vec<(Vec<String>, String)> {
    let mut out: Vec<(Vec<String>, String)> = Vec::new();
    if !cfg.replace_defaults {
        for (lang, words) in REVOCATION_WORDS {
            out.extend(words.iter().map(|w| (tokens(w), lang.to_string())));
        }
    }
    for (lang, words) in &cfg.opt_out {
        let single = words.iter().map(|w| tokens(w)).filter(|t| t.len() == 1);
        out.extend(single.map(|t| (t, lang.clone())));
    }
    out.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
    out
}

fn detection(status: Status, e: &Entry) -> Detection {
    Detection {
        status,
        language: Some(e.language.clone()),
        matched: e.tokens.join(" "),
        scope: e.scope,
    }
}

fn payload_detection(status: Status, payload: &str, scope: Option<Scope>) -> Detection {
    Detection {
        status,
        language: None,
        matched: format!("payload {payload}"),
        scope,
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

    /// Revocations in plain sentences: (message, clearly an opt-out, language).
    const SENTENCES: &[(&str, bool, Option<&str>)] = &[
        ("I want to opt out", true, Some("en")),
        ("i want to opt-out please", true, Some("en")),
        ("I'd like to unsubscribe", true, Some("en")),
        (
            "I would like to opt out of these messages",
            true,
            Some("en"),
        ),
        ("opt me out", true, Some("en")),
        ("Opt me out please", true, Some("en")),
        ("cancel subscription", true, Some("en")),
        ("Cancel my subscription", true, Some("en")),
        ("please cancel my subscription", true, Some("en")),
        ("no more messages", true, Some("en")),
        ("No more texts please", true, Some("en")),
        ("stop it", true, Some("en")),
        ("Stop it!", true, Some("en")),
        ("please stop messaging me", true, Some("en")),
        ("stop texting me", true, Some("en")),
        ("unsubscribe me", true, Some("en")),
        ("can you please stop", true, Some("en")),
        ("just stop", true, Some("en")),
        ("take me off your list", true, Some("en")),
        ("leave me alone", true, Some("en")),
        ("don't message me", true, Some("en")),
        ("do not contact me", true, Some("en")),
        ("I want to stop receiving messages", true, Some("en")),
        ("stop getting texts from you", true, Some("en")),
        ("quiero darme de baja", true, Some("es")),
        ("No quiero recibir más mensajes", true, Some("es")),
        ("cancelar suscripción", true, Some("es")),
        ("dejen de escribirme por favor", true, Some("es")),
        ("quero sair", true, Some("pt")),
        ("não quero mais receber mensagens", true, Some("pt")),
        ("cancelar inscrição", true, Some("pt")),
        ("parem de me enviar mensagens", true, Some("pt")),
        ("je veux me désabonner", true, Some("fr")),
        ("Arrêtez svp", true, Some("fr")),
        ("ich möchte mich abmelden", true, Some("de")),
        ("Bitte keine Nachrichten mehr", true, Some("de")),
        ("停止", true, Some("ja")),
        ("配信停止", true, Some("ja")),
        ("配信停止してください", true, Some("ja")),
        // Not opt-outs: negations, idioms, other business.
        ("don't stop", false, None),
        ("I can't stop laughing", false, None),
        ("stop by the store", false, None),
        ("I want to stop by", false, None),
        ("I don't want to opt out", false, None),
        ("I want to cancel my order", false, None),
        ("can I cancel?", false, None),
        ("could you stop?", false, None),
        ("I want to subscribe", false, None),
        ("no more than two items", false, None),
        ("I need to end the call", false, None),
        ("just checking my order", false, None),
        ("you can leave it at the door", false, None),
    ];

    #[test]
    fn revocations_in_sentences() {
        let d = Detector::default();
        let mut failures = Vec::new();
        for (text, out, lang) in SENTENCES {
            let got = d.detect_text(text);
            let ok = match got.as_ref() {
                Some(g) => *out && g.status == Out && g.language.as_deref() == *lang,
                None => !*out,
            };
            if !ok {
                failures.push(format!("{text:?}: expected {out}/{lang:?}, got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// (message, possible opt-out language) for messages that are not clear opt-outs.
    const POSSIBLE: &[(&str, Option<&str>)] = &[
        (
            "stop sending me the catalogue, I only want my orders",
            Some("en"),
        ),
        ("could you stop?", Some("en")),
        ("Can you stop these?", Some("en")),
        (
            "how do I unsubscribe from the newsletter but keep orders?",
            Some("en"),
        ),
        ("I want to stop receiving the weekly offers", Some("en")),
        ("STOP sending promos on Sunday", Some("en")),
        (
            "I said to opt out already, why am I still getting these",
            Some("en"),
        ),
        ("como puedo desuscribirme del boletín", Some("es")),
        ("quero descadastrar meu email", Some("pt")),
        ("comment me désabonner de la newsletter", Some("fr")),
        ("wie kann ich mich vom Newsletter abmelden", Some("de")),
        ("メール配信停止の方法を教えて", Some("ja")),
        // Not even possible: no revocation word, a negation, an idiom.
        ("don't stop", None),
        ("Don't stop!", None),
        ("I can't stop laughing", None),
        ("stop by the store", None),
        ("I'll stop by tomorrow", None),
        ("where is the bus stop", None),
        ("the STOP sign is broken", None),
        ("can I cancel my order?", None),
        ("remove the item from my cart", None),
        ("unstoppable", None),
        ("stopwatch", None),
        ("Bitte nicht abmelden", None),
        ("hello", None),
        ("", None),
    ];

    #[test]
    fn possible_opt_outs() {
        let d = Detector::default();
        let mut failures = Vec::new();
        for (text, lang) in POSSIBLE {
            let clear = d.detect_text(text);
            let got = d.possible_opt_out(text);
            let got_lang = got.as_ref().and_then(|g| g.language.as_deref());
            if clear.is_some() || got_lang != *lang {
                failures.push(format!(
                    "{text:?}: expected {lang:?}, got {clear:?} / {got:?}"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        let long = format!("{} stop", "word ".repeat(300));
        assert_eq!(d.possible_opt_out(&long), None);
    }

    #[test]
    fn stop_promotions_is_marketing_in_every_label_and_as_text() {
        let d = Detector::default();
        let mkt = Some(Scope::Marketing);
        for label in [
            "Stop promotions",
            "STOP PROMOTIONS",
            "Detener promociones",
            "Parar promoções",
            "parar promocoes",
        ] {
            let b = d.detect_button(Some(label), Some(label)).unwrap();
            assert_eq!((b.status, b.scope), (Out, mkt), "button {label}");
            let b = d.detect_button(Some("x-17"), Some(label)).unwrap();
            assert_eq!((b.status, b.scope), (Out, mkt), "title {label}");
            let t = d.detect_text(label).unwrap();
            assert_eq!((t.status, t.scope), (Out, mkt), "text {label}");
        }
        assert_eq!(d.detect_text("stop promotions please").unwrap().scope, mkt);
        assert_eq!(d.detect_text("no more promotions").unwrap().scope, mkt);
        assert_eq!(d.detect_text("STOP").unwrap().scope, None);
        assert_eq!(d.detect_text("stop all").unwrap().scope, Some(Scope::All));
        assert_eq!(d.detect_text("unsubscribe").unwrap().scope, None);
    }

    #[test]
    fn scopes_are_configured_per_keyword_and_payload() {
        let cfg = Keywords {
            opt_out: BTreeMap::from([("en".to_string(), vec!["HALT".to_string()])]),
            opt_out_payloads: vec!["MKT_STOP".into(), "ALL_STOP".into()],
            scopes: BTreeMap::from([
                ("halt".to_string(), "marketing".to_string()),
                ("STOP PROMOTIONS".to_string(), "all".to_string()),
            ]),
            payload_scopes: BTreeMap::from([("MKT_STOP".to_string(), "marketing".to_string())]),
            ..Keywords::default()
        };
        assert_eq!(cfg.problems(), vec![]);
        let d = Detector::new(&cfg);
        assert_eq!(
            d.detect_text("Halt!").unwrap().scope,
            Some(Scope::Marketing)
        );
        assert_eq!(
            d.detect_text("stop promotions").unwrap().scope,
            Some(Scope::All)
        );
        let b = d.detect_button(Some("MKT_STOP"), Some("Not now")).unwrap();
        assert_eq!((b.status, b.scope), (Out, Some(Scope::Marketing)));
        assert_eq!(d.detect_button(Some("ALL_STOP"), None).unwrap().scope, None);
    }

    #[test]
    fn scope_and_list_problems_name_their_keys() {
        let cfg = Keywords {
            opt_out: BTreeMap::from([
                (
                    "en".to_string(),
                    vec!["HALT".into(), "halt!".into(), "".into()],
                ),
                ("it".to_string(), vec!["Halt".into()]),
            ]),
            opt_out_payloads: vec!["A".into(), "A".into(), " ".into()],
            scopes: BTreeMap::from([
                ("HALT".to_string(), "promo".to_string()),
                ("Halt.".to_string(), "all".to_string()),
                ("WHATEVER".to_string(), "all".to_string()),
                ("!!".to_string(), "all".to_string()),
            ]),
            payload_scopes: BTreeMap::from([
                ("A".to_string(), "Marketing".to_string()),
                ("B".to_string(), "all".to_string()),
            ]),
            ..Keywords::default()
        };
        let p = cfg.problems();
        let has = |k: &str, m: &str| p.iter().any(|(key, msg)| key == k && msg.contains(m));
        for (k, m) in [
            ("keywords.opt_out.en", "listed twice"),
            ("keywords.opt_out.en", "no letters or digits"),
            ("keywords.opt_out.it", "listed twice"),
            ("keywords.opt_out_payloads", "listed twice"),
            ("keywords.opt_out_payloads", "empty payload"),
            ("keywords.scopes.HALT", "unknown scope \"promo\""),
            ("keywords.scopes.Halt.", "the same keyword"),
            (
                "keywords.scopes.WHATEVER",
                "not an opt-out or opt-in keyword",
            ),
            ("keywords.scopes.!!", "no letters or digits"),
            ("keywords.payload_scopes.A", "unknown scope \"Marketing\""),
            ("keywords.payload_scopes.B", "not listed"),
        ] {
            assert!(has(k, m), "missing {k}: {m} in {p:#?}");
        }
        // Built-in words can be scoped without being listed again.
        let ok = Keywords {
            scopes: BTreeMap::from([("Stop promotions".to_string(), "all".to_string())]),
            ..Keywords::default()
        };
        assert_eq!(ok.problems(), vec![]);
    }
}
