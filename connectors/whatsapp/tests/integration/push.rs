//! Confirmation replies against the fake Graph API over real HTTP.

use std::time::Duration;

use crate::common::*;
use optout_core::{
    Connector, ConnectorError, Identity, PushItem, PushOutcome, Reply, Scope, Status, Timestamp,
};
use optout_whatsapp::fake::{FakeGraph, GraphOptions, start_graph};

const ENABLED: &str = "[confirmations]\nenabled = true";

async fn graph() -> FakeGraph {
    start_graph(GraphOptions {
        token: ACCESS_TOKEN.into(),
        phone_number_id: PHONE_NUMBER_ID.into(),
        ..GraphOptions::default()
    })
    .await
}

fn item(to: Identity, in_reply_to: &str, status: Status, language: Option<&str>) -> PushItem {
    PushItem {
        key: format!("reply:{in_reply_to}"),
        record: "whatsapp".into(),
        status,
        scope: Scope::All,
        changed_at: Timestamp::now(),
        source: "whatsapp:keyword".into(),
        subject: "s-1".into(),
        identities: vec![to.clone()],
        reply: Some(Reply {
            to,
            in_reply_to: in_reply_to.into(),
            window_ends: Timestamp::now().plus(Duration::from_secs(3600)),
            language: language.map(String::from),
            clarify: false,
        }),
    }
}

fn wa(n: &str) -> Identity {
    Identity::WaId(n.into())
}

#[tokio::test]
async fn a_confirmation_is_sent_once_with_the_right_text_and_context() {
    let g = graph().await;
    let secrets = Secrets::new();
    let (c, _) = connector(config(&secrets, &g.base_url(), ENABLED));
    let out = c
        .push(&[
            item(wa("16505551234"), "wamid.IN1", Status::OptedOut, Some("es")),
            item(
                Identity::Bsuid("US.77".into()),
                "wamid.IN2",
                Status::OptedIn,
                None,
            ),
        ])
        .await
        .unwrap();
    assert_eq!(out, vec![PushOutcome::Done, PushOutcome::Done]);
    assert_eq!(g.requests("messages"), 2);
    let sent = g.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].to.as_deref(), Some("16505551234"));
    assert_eq!(sent[0].context_message_id.as_deref(), Some("wamid.IN1"));
    assert!(
        sent[0].text.starts_with("Has sido dado de baja"),
        "{}",
        sent[0].text
    );
    assert_eq!(sent[0].body["recipient_type"], "individual");
    assert_eq!(sent[0].body["text"]["preview_url"], false);
    assert_eq!(
        sent[1].recipient.as_deref(),
        Some("US.77"),
        "username users are addressed by BSUID"
    );
    assert_eq!(sent[1].to, None);
    assert!(
        sent[1].text.starts_with("You are subscribed again"),
        "{}",
        sent[1].text
    );
    assert_eq!(c.max_batch(), 20);
}

#[tokio::test]
async fn configured_texts_replace_the_built_in_ones() {
    let g = graph().await;
    let secrets = Secrets::new();
    let extra = format!(
        "{ENABLED}\ndefault_language = \"it\"\ntexts.it = {{ opted_out = \"Fatto: niente più messaggi.\", opted_in = \"Bentornato.\" }}"
    );
    let (c, _) = connector(config(&secrets, &g.base_url(), &extra));
    let out = c
        .push(&[item(wa("39333"), "wamid.X", Status::OptedOut, Some("xx"))])
        .await
        .unwrap();
    assert_eq!(out, vec![PushOutcome::Done]);
    assert_eq!(g.sent()[0].text, "Fatto: niente più messaggi.");
}

#[tokio::test]
async fn a_closed_window_sends_nothing() {
    let g = graph().await;
    let secrets = Secrets::new();
    let (c, _) = connector(config(&secrets, &g.base_url(), ENABLED));
    let mut late = item(wa("16505551234"), "wamid.OLD", Status::OptedOut, None);
    late.reply.as_mut().unwrap().window_ends = Timestamp::now().minus(Duration::from_secs(1));
    let out = c.push(&[late]).await.unwrap();
    assert_eq!(
        out,
        vec![PushOutcome::Rejected {
            reason: "24-hour window closed".into()
        }]
    );
    assert_eq!(g.requests("messages"), 0);
}

#[tokio::test]
async fn only_replies_are_taken_and_disabled_confirmations_send_nothing() {
    let g = graph().await;
    let secrets = Secrets::new();
    let mut not_reply = item(wa("1"), "wamid.A", Status::OptedOut, None);
    not_reply.reply = None;
    let reply = item(wa("2"), "wamid.B", Status::OptedOut, None);

    let (off, _) = connector(config(&secrets, &g.base_url(), ""));
    let out = off.push(&[not_reply.clone(), reply.clone()]).await.unwrap();
    assert_eq!(
        out,
        vec![
            PushOutcome::Rejected {
                reason: "whatsapp takes confirmation replies only".into()
            },
            PushOutcome::Done,
        ]
    );
    assert_eq!(
        g.requests("messages"),
        0,
        "disabled: reported done, nothing sent"
    );
    assert!(off.health().await.ok);
    assert_eq!(
        g.requests("phone_number"),
        0,
        "disabled: health needs nothing remote"
    );

    let (on, _) = connector(config(&secrets, &g.base_url(), ENABLED));
    let out = on.push(&[not_reply, reply]).await.unwrap();
    assert!(matches!(out[0], PushOutcome::Rejected { .. }));
    assert_eq!(out[1], PushOutcome::Done);
    assert_eq!(g.requests("messages"), 1);
}

#[tokio::test]
async fn retryable_and_rejected_codes() {
    let g = graph().await;
    let secrets = Secrets::new();
    let (c, _) = connector(config(&secrets, &g.base_url(), ENABLED));
    g.fail_recipient("100", 131056);
    g.fail_recipient("101", 131047);
    g.fail_recipient("103", 131026);
    g.fail_recipient("104", 131000);
    g.fail_recipient("105", 368);
    let out = c
        .push(&[
            item(wa("100"), "m0", Status::OptedOut, None),
            item(wa("101"), "m1", Status::OptedOut, None),
            item(wa("102"), "m2", Status::OptedOut, None),
            item(wa("103"), "m3", Status::OptedOut, None),
            item(wa("104"), "m4", Status::OptedOut, None),
            item(wa("105"), "m5", Status::OptedOut, None),
        ])
        .await
        .unwrap();
    let kinds: Vec<&str> = out
        .iter()
        .map(|o| match o {
            PushOutcome::Done => "done",
            PushOutcome::RetryLater { .. } => "retry",
            PushOutcome::Rejected { .. } => "rejected",
        })
        .collect();
    assert_eq!(
        kinds,
        vec!["retry", "rejected", "done", "rejected", "retry", "rejected"]
    );
    let PushOutcome::Rejected { reason } = &out[1] else {
        unreachable!()
    };
    assert!(
        reason.contains("131047") && reason.contains("Re-engagement"),
        "{reason}"
    );
    assert_eq!(g.requests("messages"), 6);
    assert_eq!(g.sent().len(), 1);
}

#[tokio::test]
async fn an_account_wide_throttle_holds_back_the_rest_of_the_batch() {
    let g = graph().await;
    let secrets = Secrets::new();
    let (c, _) = connector(config(&secrets, &g.base_url(), ENABLED));
    g.fail_next(1, 130429);
    let batch: Vec<PushItem> = (0..3)
        .map(|i| {
            item(
                wa(&format!("20{i}")),
                &format!("m{i}"),
                Status::OptedOut,
                None,
            )
        })
        .collect();
    let out = c.push(&batch).await.unwrap();
    for o in &out {
        match o {
            PushOutcome::RetryLater { after, reason } => {
                assert_eq!(
                    *after,
                    Some(Duration::from_secs(1)),
                    "the Retry-After hint is passed on"
                );
                assert!(reason.contains("130429"), "{reason}");
            }
            other => panic!("expected retry, got {other:?}"),
        }
    }
    assert_eq!(g.requests("messages"), 1, "nothing sent after the throttle");
    // The next call goes through.
    assert_eq!(c.push(&batch).await.unwrap(), vec![PushOutcome::Done; 3]);
}

#[tokio::test]
async fn fault_rates_split_a_batch_into_done_and_retry() {
    let g = graph().await;
    let secrets = Secrets::new();
    let (c, _) = connector(config(&secrets, &g.base_url(), ENABLED));
    g.fail_rate(0.5, 131000);
    let batch: Vec<PushItem> = (0..20)
        .map(|i| {
            item(
                wa(&format!("3{i:02}")),
                &format!("r{i}"),
                Status::OptedOut,
                None,
            )
        })
        .collect();
    let out = c.push(&batch).await.unwrap();
    let done = out.iter().filter(|o| **o == PushOutcome::Done).count();
    let retry = out
        .iter()
        .filter(|o| matches!(o, PushOutcome::RetryLater { .. }))
        .count();
    assert_eq!(done + retry, 20);
    assert!(done > 0 && retry > 0, "done {done}, retry {retry}");
    assert_eq!(g.sent().len(), done);
    assert_eq!(g.errors_returned(131000) as usize, retry);
}

#[tokio::test]
async fn an_expired_token_is_an_auth_alarm_until_the_secret_is_rotated() {
    let g = graph().await;
    let secrets = Secrets::new();
    let (c, _) = connector(config(&secrets, &g.base_url(), ENABLED));
    assert!(c.health().await.ok);

    g.set_token("rotated-token");
    let err = c
        .push(&[item(wa("16505551234"), "m", Status::OptedOut, None)])
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Unauthorized(_)), "{err:?}");
    assert!(err.is_alarm());
    assert!(err.to_string().contains("190"), "{err}");
    assert!(
        !err.to_string().contains(ACCESS_TOKEN),
        "the token never appears in errors"
    );
    let health = c.health().await;
    assert!(!health.ok && health.detail.contains("190"), "{health:?}");

    // The operator rotates the secret file: the next 190 re-reads it once and retries.
    secrets.write("access-token", "rotated-token");
    let before = g.requests("messages");
    let out = c
        .push(&[item(wa("16505551234"), "m", Status::OptedOut, None)])
        .await
        .unwrap();
    assert_eq!(out, vec![PushOutcome::Done]);
    assert_eq!(
        g.requests("messages") - before,
        2,
        "one refusal, one retry with the new token"
    );
    assert_eq!(g.sent().len(), 1);
}

#[tokio::test]
async fn a_permission_error_is_forbidden() {
    let g = graph().await;
    let secrets = Secrets::new();
    let (c, _) = connector(config(&secrets, &g.base_url(), ENABLED));
    g.fail_next(1, 200);
    let err = c
        .push(&[item(wa("1"), "m", Status::OptedOut, None)])
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Forbidden(_)), "{err:?}");
}

#[tokio::test]
async fn an_auth_refusal_after_a_send_keeps_per_item_outcomes() {
    let g = graph().await;
    let secrets = Secrets::new();
    let (c, _) = connector(config(&secrets, &g.base_url(), ENABLED));
    g.fail_recipient("402", 190);
    let out = c
        .push(&[
            item(wa("401"), "a", Status::OptedOut, None),
            item(wa("402"), "b", Status::OptedOut, None),
            item(wa("403"), "c", Status::OptedOut, None),
        ])
        .await
        .unwrap();
    assert_eq!(
        out[0],
        PushOutcome::Done,
        "the sent confirmation is not resent by a batch retry"
    );
    assert!(matches!(out[1], PushOutcome::RetryLater { .. }));
    assert!(matches!(out[2], PushOutcome::RetryLater { .. }));
    assert_eq!(g.requests("messages"), 2, "nothing sent after the refusal");
}

#[tokio::test]
async fn a_dead_graph_is_retried_later_not_rejected() {
    let g = graph().await;
    let url = g.base_url();
    g.stop();
    drop(g);
    let secrets = Secrets::new();
    let (c, _) = connector(config(&secrets, &url, ENABLED));
    let out = c
        .push(&[item(wa("1"), "m", Status::OptedOut, None)])
        .await
        .unwrap();
    assert!(
        matches!(&out[0], PushOutcome::RetryLater { reason, .. } if reason.contains("could not connect")),
        "{out:?}"
    );
}

#[tokio::test]
async fn the_fake_enforces_the_pair_rate_limit() {
    let g = start_graph(GraphOptions {
        token: ACCESS_TOKEN.into(),
        phone_number_id: PHONE_NUMBER_ID.into(),
        pair_interval: Some(Duration::from_secs(60)),
        ..GraphOptions::default()
    })
    .await;
    let secrets = Secrets::new();
    let (c, _) = connector(config(&secrets, &g.base_url(), ENABLED));
    let out = c
        .push(&[
            item(wa("500"), "a", Status::OptedOut, None),
            item(wa("500"), "b", Status::OptedIn, None),
            item(wa("501"), "c", Status::OptedOut, None),
        ])
        .await
        .unwrap();
    assert_eq!(out[0], PushOutcome::Done);
    assert!(
        matches!(&out[1], PushOutcome::RetryLater { reason, .. } if reason.contains("131056")),
        "{out:?}"
    );
    assert_eq!(
        out[2],
        PushOutcome::Done,
        "a pair limit holds back only that recipient"
    );
}

#[test]
fn construction_refuses_bad_config_and_unreadable_secrets() {
    let secrets = Secrets::new();
    let mut cfg = config(&secrets, "http://127.0.0.1:9", ENABLED);
    cfg.access_token = None;
    let err = optout_whatsapp::WhatsApp::new("wa", cfg, optout_whatsapp::fake::MemoryInbox::new())
        .unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Config(m) if m.contains("access_token")),
        "{err:?}"
    );

    let mut cfg = config(&secrets, "http://127.0.0.1:9", "");
    cfg.app_secrets.push(optout_core::SecretRef::File(
        "/nonexistent/app-secret".into(),
    ));
    let err = optout_whatsapp::WhatsApp::new("wa", cfg, optout_whatsapp::fake::MemoryInbox::new())
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("app_secrets[2]") && msg.contains("/nonexistent/app-secret"),
        "{msg}"
    );
    assert!(!msg.contains(APP_SECRET));
}

/// The fake follows Meta's BSUID rules for the Messages API: `recipient` takes a BSUID,
/// `to` a phone number, `to` wins when both are sent, and the answer names the user by
/// `user_id` for a BSUID-only send and by `wa_id` otherwise.
#[tokio::test]
async fn the_graph_fake_addresses_by_to_or_recipient_as_meta_documents() {
    let g = graph().await;
    let send = |body: serde_json::Value| {
        let url = format!("{}/v23.0/{PHONE_NUMBER_ID}/messages", g.base_url());
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(ACCESS_TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let text = |extra: serde_json::Value| {
        let mut b = serde_json::json!({"messaging_product": "whatsapp", "recipient_type": "individual",
            "type": "text", "text": {"body": "hi"}});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let (status, v) = send(text(
        serde_json::json!({"recipient": "US.13491208655302741918"}),
    ))
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["contacts"][0]["user_id"], "US.13491208655302741918");
    assert!(v["contacts"][0].get("wa_id").is_none(), "{v}");

    let (status, v) = send(text(
        serde_json::json!({"to": "16505551234", "recipient": "US.13491208655302741918"}),
    ))
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["contacts"][0]["input"], "16505551234",
        "`to` takes precedence"
    );
    assert_eq!(v["contacts"][0]["wa_id"], "16505551234");

    for wrong in [
        serde_json::json!({"to": "US.13491208655302741918"}),
        serde_json::json!({"recipient": "16505551234"}),
        serde_json::json!({}),
    ] {
        let (status, v) = send(text(wrong.clone())).await;
        assert_eq!(status, 400, "{wrong}: {v}");
    }
}
