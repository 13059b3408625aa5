//! The push side: WhatsApp takes only confirmation replies (one per opt-out or opt-in
//! keyword, inside the 24-hour window). Suppression itself happens in the daemon's send
//! gate; there is nothing to write to Meta for it.
//!
//! Items are sent one by one, in order, because a confirmation is not idempotent: once one
//! has gone out in a call, that call must report per-item outcomes (`Ok`) rather than fail as
//! a whole and have the core resend the batch. So the whole call fails (an auth alarm) only
//! when the credentials are refused before anything was sent; a refusal later in the batch
//! marks the rest `RetryLater`, and the next call raises the alarm.

use optout_core::{ConnectorError, Identity, PushItem, PushOutcome, Scope, Status, Timestamp};
use serde_json::{Value, json};

use crate::client::{Class, Graph, Reply};
use crate::config::{BUILTIN_CLARIFY, BUILTIN_MARKETING_OPTED_OUT, Confirmations, Texts};

pub(crate) const NOT_A_REPLY: &str = "whatsapp takes confirmation replies only";
pub(crate) const WINDOW_CLOSED: &str = "24-hour window closed";

pub(crate) async fn push(
    graph: Option<&Graph>,
    confirmations: &Confirmations,
    texts: &std::collections::BTreeMap<String, Texts>,
    batch: &[PushItem],
    now: Timestamp,
) -> Result<Vec<PushOutcome>, ConnectorError> {
    let mut out = Vec::with_capacity(batch.len());
    let mut sent_any = false;
    // Set after an account-wide throttle or an auth refusal: later items are not sent.
    let mut halt: Option<PushOutcome> = None;
    for item in batch {
        let reply = match reply_to_send(item, confirmations, now) {
            Ok(reply) => reply,
            Err(settled) => {
                out.push(settled);
                continue;
            }
        };
        if let Some(h) = &halt {
            out.push(h.clone());
            continue;
        }
        let Some(graph) = graph else {
            return Err(ConnectorError::Config(
                "confirmations are enabled but no access_token is set".into(),
            ));
        };
        let lang = reply.language.as_deref();
        let default = &confirmations.default_language;
        let text = if reply.clarify {
            pick_optional(texts, default, lang, BUILTIN_CLARIFY, |t| &t.clarify)
        } else if item.scope == Scope::Marketing && item.status == Status::OptedOut {
            let marketing = BUILTIN_MARKETING_OPTED_OUT;
            pick_optional(texts, default, lang, marketing, |t| &t.opted_out_marketing)
        } else {
            pick_text(
                texts,
                &confirmations.default_language,
                reply.language.as_deref(),
                item.status,
            )
        };
        let body = message_body(&reply.to, &reply.in_reply_to, text);
        let verdict = verdict(graph.send_message(&body).await, sent_any)?;
        sent_any |= matches!(verdict.outcome, PushOutcome::Done);
        if verdict.halts {
            halt = Some(verdict.outcome.clone());
        }
        out.push(verdict.outcome);
    }
    Ok(out)
}

/// The reply an item asks to send, or the outcome it gets without sending anything: it is
/// not a reply, confirmations are off, or the 24-hour window has closed.
fn reply_to_send<'a>(
    item: &'a PushItem,
    confirmations: &Confirmations,
    now: Timestamp,
) -> Result<&'a optout_core::Reply, PushOutcome> {
    let Some(reply) = &item.reply else {
        return Err(PushOutcome::Rejected {
            reason: NOT_A_REPLY.into(),
        });
    };
    if !confirmations.enabled {
        // Confirmations are optional; the decision itself needs nothing from Meta.
        return Err(PushOutcome::Done);
    }
    if now > reply.window_ends {
        return Err(PushOutcome::Rejected {
            reason: WINDOW_CLOSED.into(),
        });
    }
    Ok(reply)
}

/// What one send's reply means for its item.
struct Verdict {
    outcome: PushOutcome,
    /// The reply concerns the whole account (a throttle, or credentials refused after
    /// something was sent): the call's later items get the same outcome without a send.
    halts: bool,
}

/// Reads a send's reply. Credentials refused before anything was sent fail the whole call
/// (the auth alarm); see the module doc for why not later.
fn verdict(reply: Reply, sent_any: bool) -> Result<Verdict, ConnectorError> {
    let item = |outcome| Verdict {
        outcome,
        halts: false,
    };
    let halt = |after, reason| Verdict {
        outcome: PushOutcome::RetryLater { after, reason },
        halts: true,
    };
    Ok(match reply {
        Reply::Ok(_) => item(PushOutcome::Done),
        Reply::Graph(e) => match e.class() {
            Class::Throttled => halt(e.retry_after, e.describe()),
            Class::Retry => item(PushOutcome::RetryLater {
                after: e.retry_after,
                reason: e.describe(),
            }),
            Class::Reject => item(PushOutcome::Rejected {
                reason: e.describe(),
            }),
            class @ (Class::Unauthorized | Class::Forbidden) => {
                if !sent_any {
                    return Err(auth_error(class, e.describe()));
                }
                halt(None, e.describe())
            }
        },
        Reply::Http(reason, class) => match class {
            Class::Reject => item(PushOutcome::Rejected { reason }),
            Class::Unauthorized | Class::Forbidden if !sent_any => {
                return Err(auth_error(class, reason));
            }
            Class::Throttled | Class::Unauthorized | Class::Forbidden => halt(None, reason),
            Class::Retry => item(PushOutcome::RetryLater {
                after: None,
                reason,
            }),
        },
    })
}

fn auth_error(class: Class, reason: String) -> ConnectorError {
    if class == Class::Forbidden {
        ConnectorError::Forbidden(reason)
    } else {
        ConnectorError::Unauthorized(reason)
    }
}

/// The text for `language` ("es-MX" falls back to "es"), else for the default language.
pub(crate) fn pick_text<'a>(
    texts: &'a std::collections::BTreeMap<String, Texts>,
    default_language: &str,
    language: Option<&str>,
    status: Status,
) -> &'a str {
    let by = |l: &str| texts.get(l).or_else(|| texts.get(&l.to_ascii_lowercase()));
    let t = language
        .and_then(|l| by(l).or_else(|| by(l.split(['-', '_']).next().unwrap_or(l))))
        .or_else(|| by(default_language))
        .or_else(|| texts.values().next())
        .expect("built-in texts are never empty");
    match status {
        Status::OptedOut => &t.opted_out,
        Status::OptedIn => &t.opted_in,
    }
}

/// An optional text (the clarification of a possible opt-out, the confirmation of a
/// marketing opt-out) in `language`, with the same fallbacks as [`pick_text`]: a configured
/// language without it uses the built-in text of that language, then the default
/// language's, then the first built-in one.
pub(crate) fn pick_optional<'a>(
    texts: &'a std::collections::BTreeMap<String, Texts>,
    default_language: &str,
    language: Option<&str>,
    builtins: &'static [(&'static str, &'static str)],
    field: impl Fn(&Texts) -> &Option<String>,
) -> &'a str {
    let by = |l: &str| {
        let t = texts.get(l).or_else(|| texts.get(&l.to_ascii_lowercase()));
        t.and_then(|t| field(t).as_deref())
    };
    let builtin = |l: &str| {
        let l = l.to_ascii_lowercase();
        let short = l.split(['-', '_']).next().unwrap_or(&l).to_string();
        (builtins.iter())
            .find(|(k, _)| *k == l || *k == short)
            .map(|(_, t)| *t)
    };
    let lang = |l: &str| {
        by(l)
            .or_else(|| by(l.split(['-', '_']).next().unwrap_or(l)))
            .or_else(|| builtin(l))
    };
    language
        .and_then(lang)
        .or_else(|| lang(default_language))
        .unwrap_or(builtins[0].1)
}

/// A free-form text reply in the context of the customer's message. Username users without
/// a phone number are addressed by BSUID in `recipient` instead of `to`: Meta's
/// business-scoped user ID documentation (2026) adds `recipient` to the Messages API for a
/// BSUID or parent BSUID, keeps `to` for phone numbers, and lets `to` win when both are
/// sent. The v23.0 OpenAPI description predates that field. A phone number is preferred
/// whenever one is known (the core picks `wa_id` first), as Meta recommends.
pub(crate) fn message_body(to: &Identity, in_reply_to: &str, text: &str) -> Value {
    let mut body = json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "type": "text",
        "text": {"preview_url": false, "body": text},
        "context": {"message_id": in_reply_to},
    });
    match to {
        Identity::WaId(v) | Identity::Phone(v) => body["to"] = json!(v),
        Identity::Bsuid(v) => body["recipient"] = json!(v),
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::default_texts;

    #[test]
    fn picks_texts_by_language_with_fallbacks() {
        let t = default_texts();
        assert!(pick_text(&t, "en", Some("es"), Status::OptedOut).starts_with("Has sido"));
        assert!(pick_text(&t, "en", Some("es-MX"), Status::OptedOut).starts_with("Has sido"));
        assert!(pick_text(&t, "en", Some("DE"), Status::OptedIn).starts_with("Sie sind"));
        assert!(pick_text(&t, "en", Some("it"), Status::OptedOut).starts_with("You have been"));
        assert!(pick_text(&t, "fr", None, Status::OptedIn).starts_with("Vous êtes de nouveau"));
    }

    #[test]
    fn clarifications_and_marketing_confirmations_have_texts_of_their_own() {
        let mut t = default_texts();
        let pick = |t: &std::collections::BTreeMap<String, Texts>, l| {
            pick_optional(t, "en", l, BUILTIN_CLARIFY, |x| &x.clarify).to_string()
        };
        assert!(pick(&t, Some("es-MX")).starts_with("Responde BAJA"));
        assert!(pick(&t, Some("it")).starts_with("Reply STOP"));
        assert!(pick(&t, None).starts_with("Reply STOP"));
        // A configured language without the text keeps the built-in one of its language.
        t.insert(
            "de".into(),
            Texts {
                opted_out: "Ab.".into(),
                opted_in: "An.".into(),
                clarify: None,
                opted_out_marketing: None,
            },
        );
        assert!(pick(&t, Some("de")).starts_with("Antworten Sie STOPP"));
        let m = pick_optional(&t, "en", Some("pt"), BUILTIN_MARKETING_OPTED_OUT, |x| {
            &x.opted_out_marketing
        });
        assert!(m.contains("promocionais"), "{m}");
    }

    #[test]
    fn addresses_username_users_by_bsuid() {
        let b = message_body(&Identity::Bsuid("US.1".into()), "wamid.x", "hi");
        assert_eq!(b["recipient"], "US.1");
        assert!(b.get("to").is_none());
        let b = message_body(&Identity::WaId("16505551234".into()), "wamid.x", "hi");
        assert_eq!(b["to"], "16505551234");
        assert_eq!(b["context"]["message_id"], "wamid.x");
        assert_eq!(b["text"]["preview_url"], false);
    }
}
