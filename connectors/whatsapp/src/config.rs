//! The connector's configuration: what the daemon deserialises from this connector's TOML
//! table (after removing its own keys), plus semantic validation and the list of secrets.
//!
//! ```toml
//! app_secrets = [{ env = "WA_APP_SECRET" }, { env = "WA_APP_SECRET_OLD" }]
//! verify_token = { env = "WA_VERIFY_TOKEN" }
//! access_token = { credential = "wa-access-token" }
//! phone_number_id = "106540352242922"
//!
//! [keywords]
//! opt_out = { en = ["HALT"] }
//! opt_out_payloads = ["OPT_OUT_BUTTON", "PROMO_STOP"]
//! scopes = { HALT = "all", "STOP PROMOTIONS" = "marketing" }
//! payload_scopes = { PROMO_STOP = "marketing" }
//!
//! [templates]
//! order_update = "utility"
//!
//! [confirmations]
//! enabled = true
//! default_language = "en"
//! texts.en = { opted_out = "You will get no more messages from us. Reply START to resubscribe.", opted_in = "You are subscribed again. Reply STOP to unsubscribe.", clarify = "Reply STOP to stop all messages." }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use optout_core::SecretRef;
use serde::Deserialize;

use crate::detect::Keywords;

pub const DEFAULT_BASE_URL: &str = "https://graph.facebook.com";
pub const DEFAULT_GRAPH_VERSION: &str = "v25.0";
/// Meta's webhook bodies are a few KiB; 1 MiB leaves room for batched deliveries while
/// bounding what an unauthenticated caller can make us buffer.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Meta's limit for a text message body.
const MAX_TEXT_CHARS: usize = 4096;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// App secrets that sign webhook bodies. A body is accepted if any of them verifies,
    /// so a secret can be rotated without dropping deliveries.
    pub app_secrets: Vec<SecretRef>,
    /// The token Meta echoes in the GET verification handshake.
    pub verify_token: SecretRef,
    /// System-user access token for the Graph API; needed only to send confirmations.
    #[serde(default)]
    pub access_token: Option<SecretRef>,
    /// Our business phone number's id (the sender of confirmations).
    #[serde(default)]
    pub phone_number_id: String,
    /// The WhatsApp Business Account's id; only the pre-flight uses it, to check that an
    /// app is subscribed to its webhooks (`GET /{waba_id}/subscribed_apps`).
    #[serde(default)]
    pub waba_id: String,
    #[serde(default = "default_graph_version")]
    pub graph_version: String,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Timeout of one Graph API request.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Inbox entries read per poll.
    #[serde(default = "default_page_size")]
    pub page_size: usize,
    /// Client-side cap on confirmation sends, so we never cause Graph throttling (130429)
    /// ourselves.
    #[serde(default = "default_max_sends_per_second")]
    pub max_sends_per_second: u32,
    #[serde(default)]
    pub keywords: Keywords,
    #[serde(default)]
    pub confirmations: Confirmations,
    /// The business portfolio the account belongs to (any label, the same for accounts
    /// of one portfolio): business-scoped user ids are unique only within a portfolio, so
    /// ids from different portfolios are never taken for one person.
    #[serde(default)]
    pub portfolio: Option<String>,
    /// Categories of templates approved before the daemon started (name → `marketing`,
    /// `utility` or `authentication`), for the send gate's `template=` question. Meta's
    /// template webhooks replace them: any announced category wins over a configured one.
    #[serde(default)]
    pub templates: BTreeMap<String, String>,
}

/// The categories Meta approves templates in.
pub const TEMPLATE_CATEGORIES: [&str; 3] = ["MARKETING", "UTILITY", "AUTHENTICATION"];

/// Meta's rule for template names: lowercase letters, digits and underscores, at most 512.
pub fn is_template_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 512
        && (name.bytes()).all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confirmations {
    /// Off by default: sending anything is a choice the business makes. When off, a
    /// confirmation push item is reported `Done` without sending.
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_language")]
    pub default_language: String,
    /// Texts by language tag. Configured languages replace the built-in text of the same
    /// language; the built-in ones stay available for the others.
    #[serde(default)]
    pub texts: BTreeMap<String, Texts>,
}

impl Default for Confirmations {
    fn default() -> Self {
        Confirmations {
            enabled: false,
            default_language: default_language(),
            texts: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Texts {
    pub opted_out: String,
    pub opted_in: String,
    /// The answer to a possible opt-out (a revocation word in a sentence that is not clearly
    /// one), sent at most once per message; without it, the built-in text of the language.
    #[serde(default)]
    pub clarify: Option<String>,
    /// The confirmation of an opt-out of marketing only ("Stop promotions"), which must not
    /// say that every message stops; without it, the built-in text of the language.
    #[serde(default)]
    pub opted_out_marketing: Option<String>,
}

/// Built-in clarifications for a possible opt-out: how to stop, in the keyword's language
/// (English first: the last fallback).
pub const BUILTIN_CLARIFY: &[(&str, &str)] = &[
    (
        "en",
        "Reply STOP to stop all messages from us, or STOP PROMOTIONS to stop offers only.",
    ),
    (
        "es",
        "Responde BAJA para dejar de recibir todos nuestros mensajes, o DETENER PROMOCIONES para dejar de recibir solo ofertas.",
    ),
    (
        "pt",
        "Responda SAIR para não receber mais nenhuma mensagem nossa, ou PARAR PROMOÇÕES para parar só as ofertas.",
    ),
    (
        "fr",
        "Répondez STOP pour ne plus recevoir aucun message de notre part.",
    ),
    (
        "ja",
        "すべてのメッセージを停止するには 停止 と返信してください。",
    ),
    (
        "de",
        "Antworten Sie STOPP, um keine Nachrichten mehr von uns zu erhalten.",
    ),
];

/// Built-in confirmations of an opt-out of marketing only (English first: the last
/// fallback).
pub const BUILTIN_MARKETING_OPTED_OUT: &[(&str, &str)] = &[
    (
        "en",
        "You will receive no more promotional messages from us. Reply STOP to stop all messages.",
    ),
    (
        "es",
        "No recibirás más mensajes promocionales nuestros. Responde BAJA para dejar de recibir todos los mensajes.",
    ),
    (
        "pt",
        "Você não receberá mais mensagens promocionais nossas. Responda SAIR para não receber nenhuma mensagem.",
    ),
    (
        "fr",
        "Vous ne recevrez plus de messages promotionnels de notre part. Répondez STOP pour ne plus recevoir aucun message.",
    ),
    (
        "de",
        "Sie erhalten keine Werbenachrichten mehr von uns. Antworten Sie STOPP, um keine Nachrichten mehr zu erhalten.",
    ),
    (
        "ja",
        "今後、プロモーションのメッセージはお送りしません。すべてのメッセージを停止するには 停止 と返信してください。",
    ),
];

/// Built-in confirmation texts. Short, factual, and naming the way back (FCC 2025 allows one
/// confirmation that says the opt-out was processed).
pub fn default_texts() -> BTreeMap<String, Texts> {
    let t = |o: &str, i: &str| Texts {
        opted_out: o.to_string(),
        opted_in: i.to_string(),
        clarify: None,
        opted_out_marketing: None,
    };
    let mut texts = BTreeMap::from([
        (
            "en".to_string(),
            t(
                "You have been unsubscribed and will receive no more messages from us. Reply START to subscribe again.",
                "You are subscribed again. Reply STOP at any time to unsubscribe.",
            ),
        ),
        (
            "es".to_string(),
            t(
                "Has sido dado de baja y no recibirás más mensajes nuestros. Responde START para volver a suscribirte.",
                "Te has vuelto a suscribir. Responde BAJA en cualquier momento para darte de baja.",
            ),
        ),
        (
            "pt".to_string(),
            t(
                "Sua inscrição foi cancelada e você não receberá mais mensagens nossas. Responda START para se inscrever novamente.",
                "Você se inscreveu novamente. Responda SAIR a qualquer momento para cancelar.",
            ),
        ),
        (
            "fr".to_string(),
            t(
                "Vous êtes désinscrit et ne recevrez plus de messages de notre part. Répondez START pour vous réinscrire.",
                "Vous êtes de nouveau inscrit. Répondez STOP à tout moment pour vous désinscrire.",
            ),
        ),
        (
            "ja".to_string(),
            t(
                "配信を停止しました。今後メッセージはお送りしません。再開するには START と返信してください。",
                "配信を再開しました。停止するにはいつでも 停止 と返信してください。",
            ),
        ),
        (
            "de".to_string(),
            t(
                "Sie wurden abgemeldet und erhalten keine Nachrichten mehr von uns. Antworten Sie START, um sich wieder anzumelden.",
                "Sie sind wieder angemeldet. Antworten Sie jederzeit STOPP, um sich abzumelden.",
            ),
        ),
    ]);
    for (lang, c) in BUILTIN_CLARIFY {
        if let Some(t) = texts.get_mut(*lang) {
            t.clarify = Some(c.to_string());
        }
    }
    for (lang, c) in BUILTIN_MARKETING_OPTED_OUT {
        if let Some(t) = texts.get_mut(*lang) {
            t.opted_out_marketing = Some(c.to_string());
        }
    }
    texts
}

fn default_graph_version() -> String {
    DEFAULT_GRAPH_VERSION.to_string()
}
fn default_base_url() -> String {
    DEFAULT_BASE_URL.to_string()
}
fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_page_size() -> usize {
    500
}
fn default_max_sends_per_second() -> u32 {
    20
}
fn default_language() -> String {
    "en".to_string()
}

impl Confirmations {
    /// Built-in texts overlaid with the configured ones.
    pub fn effective_texts(&self) -> BTreeMap<String, Texts> {
        let mut all = default_texts();
        all.extend(self.texts.clone());
        all
    }

    /// Every language must have texts WhatsApp accepts, and the default one must have texts.
    fn problems(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = Vec::new();
        let mut add = |k: &str, m: String| p.push((k.to_string(), m));
        if !self.effective_texts().contains_key(&self.default_language) {
            add(
                "confirmations.default_language",
                format!(
                    "no texts for {:?}; add confirmations.texts.{}",
                    self.default_language, self.default_language
                ),
            );
        }
        for (lang, t) in &self.texts {
            let clarify = (t.clarify.as_ref().map(|c| ("clarify", c)))
                .into_iter()
                .chain(
                    t.opted_out_marketing
                        .as_ref()
                        .map(|c| ("opted_out_marketing", c)),
                );
            for (which, s) in [("opted_out", &t.opted_out), ("opted_in", &t.opted_in)]
                .into_iter()
                .chain(clarify)
            {
                if s.trim().is_empty() {
                    add(
                        &format!("confirmations.texts.{lang}.{which}"),
                        "must not be empty".into(),
                    );
                } else if s.chars().count() > MAX_TEXT_CHARS {
                    add(
                        &format!("confirmations.texts.{lang}.{which}"),
                        format!("longer than WhatsApp's {MAX_TEXT_CHARS} characters"),
                    );
                }
            }
        }
        p
    }
}

impl Config {
    /// Semantic problems as (key, problem) pairs; secrets are not resolved here.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = self.connection_problems();
        p.extend(self.keywords.problems());
        p.extend(self.confirmations.problems());
        p.extend(self.sender_problems());
        p.extend(self.template_problems());
        if let Some(f) = &self.portfolio {
            let ok = !f.is_empty()
                && f.len() <= 64
                && (f.chars()).all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                p.push((
                    "portfolio".into(),
                    "1 to 64 letters, digits, '-' or '_'".into(),
                ));
            }
        }
        p
    }

    /// The webhook's and the Graph API client's settings.
    fn connection_problems(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = Vec::new();
        let mut add = |k: &str, m: String| p.push((k.to_string(), m));
        if self.app_secrets.is_empty() {
            add(
                "app_secrets",
                "at least one app secret is needed to verify webhook signatures".into(),
            );
        }
        if let Err(e) = reqwest::Url::parse(&self.base_url) {
            add("base_url", format!("not a URL: {e}"));
        } else if !(self.base_url.starts_with("https://") || self.base_url.starts_with("http://")) {
            add("base_url", "must be an http(s) URL".into());
        }
        let v = self.graph_version.strip_prefix('v').unwrap_or("");
        if v.is_empty() || !v.chars().all(|c| c.is_ascii_digit() || c == '.') {
            add(
                "graph_version",
                format!(
                    "expected a Graph version like \"v25.0\", got {:?}",
                    self.graph_version
                ),
            );
        }
        if self.max_body_bytes < 1024 {
            add(
                "max_body_bytes",
                "must be at least 1024 (Meta's bodies are several KiB)".into(),
            );
        }
        if self.timeout.is_zero() {
            add("timeout", "must be more than zero".into());
        }
        if self.page_size == 0 {
            add("page_size", "must be more than zero".into());
        }
        if self.max_sends_per_second == 0 {
            add("max_sends_per_second", "must be more than zero".into());
        }
        p
    }

    /// What sending confirmations needs: a token and the id of the number to send from.
    fn sender_problems(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = Vec::new();
        let mut add = |k: &str, m: String| p.push((k.to_string(), m));
        if self.confirmations.enabled {
            if self.access_token.is_none() {
                add(
                    "access_token",
                    "needed when confirmations.enabled = true".into(),
                );
            }
            if self.phone_number_id.trim().is_empty() {
                add(
                    "phone_number_id",
                    "needed when confirmations.enabled = true".into(),
                );
            }
        }
        if !self
            .phone_number_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            add(
                "phone_number_id",
                "must be the numeric id Meta shows for the number, not the phone number".into(),
            );
        }
        if !self.waba_id.chars().all(|c| c.is_ascii_digit()) {
            add(
                "waba_id",
                "must be the numeric WhatsApp Business Account id".into(),
            );
        }
        p
    }

    /// Each configured template: a name Meta accepts and one of its categories.
    fn template_problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        for (name, category) in &self.templates {
            let key = format!("templates.{name}");
            if !is_template_name(name) {
                p.push((
                    key.clone(),
                    "a template name is lowercase letters, digits and '_' (at most 512)".into(),
                ));
            }
            if !TEMPLATE_CATEGORIES.contains(&category.to_ascii_uppercase().as_str()) {
                p.push((
                    key,
                    format!(
                        "unknown category {category:?}: use marketing, utility or authentication"
                    ),
                ));
            }
        }
        p
    }

    /// Every secret reference, by key, for `check-config` to test.
    pub fn secrets(&self) -> Vec<(&'static str, &SecretRef)> {
        let mut s: Vec<(&'static str, &SecretRef)> = self
            .app_secrets
            .iter()
            .map(|r| ("app_secrets", r))
            .collect();
        s.push(("verify_token", &self.verify_token));
        if let Some(t) = &self.access_token {
            s.push(("access_token", t));
        }
        s
    }

    /// `{base_url}/{graph_version}`, without a trailing slash.
    pub fn graph_root(&self) -> String {
        format!(
            "{}/{}",
            self.base_url.trim_end_matches('/'),
            self.graph_version
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(s)
    }

    const MIN: &str = r#"
        app_secrets = [{ env = "A" }]
        verify_token = { env = "V" }
    "#;

    #[test]
    fn minimal_config_takes_defaults_and_validates() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.base_url, DEFAULT_BASE_URL);
        assert_eq!(c.graph_version, "v25.0");
        assert_eq!(c.max_body_bytes, 1024 * 1024);
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert!(!c.confirmations.enabled);
        assert_eq!(c.validate(), vec![]);
        assert_eq!(c.secrets().len(), 2);
    }

    #[test]
    fn a_portfolio_label_is_checked() {
        let ok = parse(&format!("{MIN}portfolio = \"brand-eu_1\"")).unwrap();
        assert_eq!(ok.validate(), vec![]);
        assert_eq!(ok.portfolio.as_deref(), Some("brand-eu_1"));
        for bad in ["", "a/b", "with space"] {
            let c = parse(&format!("{MIN}portfolio = {bad:?}")).unwrap();
            let keys: Vec<_> = c.validate().into_iter().map(|(k, _)| k).collect();
            assert_eq!(keys, ["portfolio"], "{bad:?}");
        }
    }

    #[test]
    fn the_documented_example_is_valid() {
        // The module doc's example, line for line.
        let doc: String = include_str!("config.rs")
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start()))
            .collect();
        let c = parse(&doc).unwrap();
        assert_eq!(c.app_secrets.len(), 2);
        assert!(c.confirmations.enabled);
        assert_eq!(
            c.keywords.opt_out_payloads,
            vec!["OPT_OUT_BUTTON", "PROMO_STOP"]
        );
        assert_eq!(c.keywords.payload_scopes["PROMO_STOP"], "marketing");
        assert_eq!(c.templates["order_update"], "utility");
        assert!(
            c.confirmations.texts["en"]
                .opted_out
                .starts_with("You will get")
        );
        assert_eq!(c.validate(), vec![]);
    }

    #[test]
    fn configured_templates_are_checked() {
        let ok = parse(&format!(
            "{MIN}[templates]\norder_update = \"UTILITY\"\npromo_2 = \"marketing\""
        ))
        .unwrap();
        assert_eq!(ok.validate(), vec![]);
        let bad = parse(&format!(
            "{MIN}[templates]\nOrder = \"utility\"\nfine = \"promotional\""
        ))
        .unwrap();
        let keys: Vec<_> = bad.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["templates.Order", "templates.fine"]);
    }

    #[test]
    fn refuses_unknown_keys_and_inline_secrets() {
        assert!(parse(&format!("{MIN}\nbogus = 1")).is_err());
        assert!(
            parse(
                r#"app_secrets = ["inline"]
            verify_token = { env = "V" }"#
            )
            .is_err()
        );
        assert!(
            parse(&format!(
                "{MIN}\n[confirmations]\nenabled = true\ncolour = 1"
            ))
            .is_err()
        );
    }

    #[test]
    fn validation_names_the_keys() {
        let c = parse(
            r#"
            app_secrets = []
            verify_token = { env = "V" }
            graph_version = "25"
            timeout = "0s"
            [keywords]
            opt_in = { en = ["STOP", "!!!"] }
            [confirmations]
            enabled = true
            default_language = "it"
            texts.it = { opted_out = "", opted_in = "Ciao" }
            "#,
        )
        .unwrap();
        let keys: Vec<String> = c.validate().into_iter().map(|(k, _)| k).collect();
        for k in [
            "app_secrets",
            "graph_version",
            "timeout",
            "keywords.opt_in.en",
            "keywords.opt_in",
            "confirmations.texts.it.opted_out",
            "access_token",
            "phone_number_id",
        ] {
            assert!(keys.iter().any(|x| x == k), "missing {k} in {keys:?}");
        }
        // "it" has a configured text, so the default language is fine.
        assert!(!keys.iter().any(|x| x == "confirmations.default_language"));
    }
}
