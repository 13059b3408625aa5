//! Limits, authentication and failures: HubSpot's 429s, the client-side limiter, the daily
//! allowance, OAuth refresh, missing scopes, server faults, health and property creation.

use std::time::{Duration, Instant};

use crate::common::{connector, item, sync};
use optout_core::testkit::records;
use optout_core::testkit::secret_file;
use optout_core::{Connector, ConnectorError, PushOutcome, Status, Timestamp};
use optout_hubspot::fake::{self, FakeOAuth, FakeOptions, Faults, Limits, NewContact};
use optout_hubspot::{HubSpot, OAuthConfig};

fn fast() -> FakeOptions {
    FakeOptions {
        limits: Limits::off(),
        ..FakeOptions::default()
    }
}

fn seed(fake: &fake::FakeHandle, n: usize) -> Vec<String> {
    let start = fake.now_ms() - 3_600_000;
    fake.create_contacts((0..n).map(|i| {
        NewContact::new()
            .with("phone", &format!("+1555{i:07}"))
            .modified_at(start + i as i64)
    }))
}

#[tokio::test]
async fn rate_limit_429s_are_honoured_without_losing_records() {
    let fake = fake::start(fast()).await;
    seed(&fake, 500);
    let c = connector(&fake, |cfg| cfg.page_size = 100);

    // The rolling window (shortened to 1 s so the test is quick): 3 requests per window.
    fake.set_limits(Limits {
        per_window: Some(3),
        window: Duration::from_secs(1),
        ..Limits::off()
    });
    let s = sync(&c, None).await;
    assert_eq!((s.records.len(), s.distinct_ids().len()), (500, 500));
    assert!(!s.errors.is_empty(), "the fake limited this run");
    for e in &s.errors {
        assert!(
            matches!(e, ConnectorError::RateLimited { policy, .. } if policy == "TEN_SECONDLY_ROLLING"),
            "{e}"
        );
        assert_eq!(
            e.retry_after(),
            Some(Duration::from_secs(1)),
            "Retry-After is honoured"
        );
    }
    assert_eq!(fake.counts().rate_limited as usize, s.errors.len());

    // The per-second search limit answers without Retry-After: about a second.
    fake.set_limits(Limits {
        search_per_second: Some(2),
        ..Limits::off()
    });
    fake.reset_counts();
    let s = sync(&c, None).await;
    assert_eq!((s.records.len(), s.distinct_ids().len()), (500, 500));
    assert!(!s.errors.is_empty());
    for e in &s.errors {
        assert!(
            matches!(e, ConnectorError::RateLimited { policy, .. } if policy == "SEARCH_SECONDLY"),
            "{e}"
        );
        assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
    }

    // A push refused by the window fails as a whole and succeeds when retried.
    fake.set_limits(Limits {
        per_window: Some(1),
        window: Duration::from_secs(1),
        ..Limits::off()
    });
    let ids = fake.contact_ids();
    let batch = [item(&ids[0], Status::OptedOut, Timestamp::now())];
    let first = c.push(&batch).await.unwrap();
    assert_eq!(first, vec![PushOutcome::Done]);
    let e = c.push(&batch).await.unwrap_err();
    assert!(matches!(e, ConnectorError::RateLimited { .. }), "{e}");
    tokio::time::sleep(e.retry_after().unwrap()).await;
    assert_eq!(c.push(&batch).await.unwrap(), vec![PushOutcome::Done]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_side_limiter_keeps_polling_and_pushing_clear_of_429s() {
    // HubSpot's real limits, set low: 10 requests per 10 s, 5 searches per second.
    let fake = fake::start(FakeOptions {
        limits: Limits {
            per_window: Some(10),
            window: Duration::from_secs(10),
            search_per_second: Some(5),
            daily: None,
        },
        ..FakeOptions::default()
    })
    .await;
    let ids = seed(&fake, 500);
    let c = std::sync::Arc::new(connector(&fake, |cfg| {
        cfg.page_size = 100;
        cfg.requests_per_10s = 10;
        cfg.search_per_second = 4;
    }));

    let started = Instant::now();
    // Polling and pushing at once share one limiter: 5 to 7 searches (the pushed contacts
    // are read again at the end if the read is still going) and 6 batch updates: more
    // requests than one 10-second window allows, whichever way the two interleave.
    let poller = {
        let c = c.clone();
        tokio::spawn(async move { sync(&c, None).await })
    };
    let items: Vec<_> = ids
        .iter()
        .take(150)
        .map(|id| item(id, Status::OptedOut, Timestamp::now()))
        .collect();
    for chunk in items.chunks(25) {
        assert!(
            c.push(chunk)
                .await
                .unwrap()
                .iter()
                .all(|o| *o == PushOutcome::Done)
        );
    }
    let s = poller.await.unwrap();
    let elapsed = started.elapsed();
    let counts = fake.counts();
    println!(
        "limiter run: {} searches, {} batch updates in {elapsed:?}, {} answered 429",
        counts.search, counts.batch_update, counts.rate_limited
    );

    assert_eq!(counts.rate_limited, 0, "no 429 while the limiter is on");
    assert!(s.errors.is_empty());
    assert_eq!(s.distinct_ids().len(), 500);
    assert_eq!(counts.batch_update, 6);
    assert!(counts.search + counts.batch_update > 10);
    assert!(
        elapsed >= Duration::from_secs(10),
        "more than 10 requests had to wait for the window"
    );
}

#[tokio::test]
async fn an_exhausted_daily_allowance_is_an_alarm_until_midnight() {
    let fake = fake::start(FakeOptions {
        limits: Limits {
            daily: Some(2),
            ..Limits::off()
        },
        ..FakeOptions::default()
    })
    .await;
    seed(&fake, 10);
    let c = connector(&fake, |_| {});
    assert!(c.health().await.ok);
    assert!(c.health().await.ok);
    let e = c.poll(None).await.unwrap_err();
    assert!(
        matches!(e, ConnectorError::QuotaExhausted { .. }) && e.is_alarm(),
        "{e}"
    );
    assert!(e.retry_after().unwrap() <= Duration::from_secs(86_400));

    // The client-side daily_limit stops before HubSpot has to.
    let fake = fake::start(fast()).await;
    let c = connector(&fake, |cfg| cfg.daily_limit = Some(1));
    c.poll(None).await.unwrap();
    let e = c.poll(None).await.unwrap_err();
    assert!(matches!(e, ConnectorError::QuotaExhausted { .. }), "{e}");
    assert_eq!(fake.counts().search, 1, "the refused poll was not sent");
}

fn oauth_connector(fake: &fake::FakeHandle) -> HubSpot {
    let secrets = tempfile::tempdir().unwrap();
    let cfg = optout_hubspot::Config {
        base_url: fake.base_url(),
        oauth: Some(OAuthConfig {
            client_id: "client-1".into(),
            client_secret: secret_file(secrets.path(), "client-secret-1"),
            refresh_token: secret_file(secrets.path(), "refresh-token-1"),
        }),
        page_size: 100,
        requests_per_10s: 1_000_000,
        search_per_second: 1_000_000,
        ..optout_hubspot::Config::default()
    };
    HubSpot::new("hubspot-oauth", cfg).unwrap()
}

#[tokio::test]
async fn an_oauth_token_expiring_mid_sync_is_refreshed_without_losing_a_page() {
    let fake = fake::start(FakeOptions {
        token: None,
        oauth: Some(FakeOAuth {
            client_id: "client-1".into(),
            client_secret: "client-secret-1".into(),
            refresh_token: "refresh-token-1".into(),
            expires_in: Duration::from_secs(1),
        }),
        limits: Limits::off(),
        ..FakeOptions::default()
    })
    .await;
    seed(&fake, 400);
    let c = oauth_connector(&fake);

    let p1 = c.poll(None).await.unwrap();
    assert_eq!(fake.counts().token, 1);
    // The token's lifetime passes. The connector refreshes at 80% of it, before sending.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let p2 = c.poll(Some(&p1.cursor)).await.unwrap();
    assert_eq!(
        (fake.counts().token, fake.counts().unauthorized),
        (2, 0),
        "refreshed before expiry, no 401"
    );

    // HubSpot invalidates the token early: one 401, one refresh, the same request again.
    fake.expire_access_tokens();
    let p3 = c.poll(Some(&p2.cursor)).await.unwrap();
    assert_eq!((fake.counts().token, fake.counts().unauthorized), (3, 1));
    let rest = sync(&c, Some(p3.cursor.clone())).await;
    let mut ids: Vec<String> = [p1, p2, p3]
        .into_iter()
        .flat_map(|p| records(p.observations))
        .map(|r| r.record)
        .collect();
    ids.extend(rest.records.iter().map(|r| r.record.clone()));
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(
        (ids.len(), distinct.len()),
        (400, 400),
        "no page lost or read twice"
    );

    // A refresh token that no longer works is an alarm, and no secret is in the message.
    fake.revoke_refresh_token();
    fake.expire_access_tokens();
    let e = c.poll(Some(&rest.cursor)).await.unwrap_err();
    assert!(
        matches!(e, ConnectorError::Unauthorized(_)) && e.is_alarm(),
        "{e}"
    );
    let shown = format!("{e} {e:?}");
    for secret in ["client-secret-1", "refresh-token-1", "fake-access-"] {
        assert!(!shown.contains(secret), "{shown}");
    }
}

#[tokio::test]
async fn server_faults_are_transient_and_lose_nothing() {
    let fake = fake::start(fast()).await;
    let ids = seed(&fake, 300);
    let c = connector(&fake, |cfg| {
        cfg.page_size = 100;
        cfg.timeout = Duration::from_millis(300);
    });
    fake.set_faults(Faults {
        error_next: 1,
        drop_next: 1,
        slow_next: 1,
        slow_by: Duration::from_secs(2),
        ..Faults::default()
    });
    let s = sync(&c, None).await;
    assert_eq!(s.distinct_ids().len(), 300);
    assert_eq!(s.errors.len(), 3, "{:?}", s.errors);
    assert!(
        s.errors
            .iter()
            .all(|e| matches!(e, ConnectorError::Transient(_))),
        "{:?}",
        s.errors
    );
    let text: Vec<String> = s.errors.iter().map(|e| e.to_string()).collect();
    assert!(text.iter().any(|t| t.contains("503")), "{text:?}");
    assert!(text.iter().any(|t| t.contains("timed out")), "{text:?}");

    // Random faults on pushes: every failure is retryable, and retrying completes the push.
    fake.set_faults(Faults {
        error_rate: 0.3,
        drop_rate: 0.2,
        error_status: 504,
        ..Faults::default()
    });
    let items: Vec<_> = ids
        .iter()
        .map(|id| item(id, Status::OptedOut, Timestamp::now()))
        .collect();
    let mut failures = 0;
    for chunk in items.chunks(100) {
        while let Err(e) = c.push(chunk).await {
            assert!(matches!(e, ConnectorError::Transient(_)), "{e}");
            failures += 1;
            assert!(failures < 50);
        }
    }
    assert!(failures > 0, "the fault rates hit some requests");
    assert!(
        ids.iter()
            .all(|id| fake.property(id, "whatsapp_consent").as_deref() == Some("opted_out"))
    );
}

#[tokio::test]
async fn missing_scopes_and_bad_tokens_are_named() {
    let fake = fake::start(fast()).await;
    let ids = seed(&fake, 3);
    let c = connector(&fake, |_| {});

    fake.set_scopes(&["crm.objects.contacts.read"]);
    let e = c
        .push(&[item(&ids[0], Status::OptedOut, Timestamp::now())])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ConnectorError::Forbidden(m) if m.starts_with("missing scope crm.objects.contacts.write")),
        "{e}"
    );
    assert!(c.health().await.ok, "reading still works");

    fake.set_scopes(&[]);
    let h = c.health().await;
    assert!(
        !h.ok && h.detail.contains("missing scope crm.objects.contacts.read"),
        "{h:?}"
    );

    let bad = HubSpot::with_token(
        "hubspot-bad",
        optout_hubspot::Config {
            base_url: fake.base_url(),
            ..Default::default()
        },
        optout_core::Secret::new("pat-na1-wrong"),
    )
    .unwrap();
    let h = bad.health().await;
    assert!(
        !h.ok && h.detail.starts_with("unauthorized") && !h.detail.contains("pat-na1-wrong"),
        "{h:?}"
    );
    let e = bad.poll(None).await.unwrap_err();
    assert!(matches!(e, ConnectorError::Unauthorized(_)));
}

#[tokio::test]
async fn create_properties_creates_what_is_missing_once() {
    let fake = fake::start(FakeOptions {
        consent_properties: false,
        limits: Limits::off(),
        ..FakeOptions::default()
    })
    .await;
    let ids = seed(&fake, 2);
    let plain = connector(&fake, |_| {});
    let e = plain
        .push(&[item(&ids[0], Status::OptedOut, Timestamp::now())])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ConnectorError::Config(m) if m.contains("PROPERTY_DOESNT_EXIST") && m.contains("whatsapp_consent")),
        "{e}"
    );

    let c = connector(&fake, |cfg| cfg.create_properties = true);
    let report = c.ensure_properties().await.unwrap();
    assert_eq!(
        report,
        [
            "created property whatsapp_consent",
            "created property whatsapp_consent_changed_at",
            "created property whatsapp_consent_source"
        ]
    );
    for name in fake::CONSENT_PROPERTIES {
        assert!(fake.has_property(name));
    }
    // Once per process when polling or pushing; 409 (exists) is fine.
    fake.reset_counts();
    c.poll(None).await.unwrap();
    c.poll(None).await.unwrap();
    assert_eq!(
        fake.counts().other,
        3,
        "the three creation requests, answered 409, then never again"
    );
    assert_eq!(
        c.push(&[item(&ids[0], Status::OptedOut, Timestamp::now())])
            .await
            .unwrap(),
        vec![PushOutcome::Done]
    );

    // Without the schema scope, creation is skipped with a warning and polling goes on.
    fake.set_scopes(&["crm.objects.contacts.read", "crm.objects.contacts.write"]);
    let e = c.ensure_properties().await.unwrap_err();
    assert!(
        matches!(&e, ConnectorError::Forbidden(m) if m.contains("crm.schemas.contacts.write")),
        "{e}"
    );
    let fresh = connector(&fake, |cfg| cfg.create_properties = true);
    assert!(fresh.poll(None).await.is_ok());
}

/// Like HubSpot (its `OptionInput` requires `hidden`, `label`, `value` and
/// `displayOrder`), the fake refuses an enumeration option without `hidden`; the
/// connector's own definitions carry it.
#[tokio::test]
async fn property_options_need_hidden_as_hubspot_requires() {
    let fake = fake::start(FakeOptions {
        consent_properties: false,
        limits: Limits::off(),
        ..FakeOptions::default()
    })
    .await;
    let create = |option: serde_json::Value| {
        let url = format!("{}/crm/v3/properties/contacts", fake.base_url());
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(fake::TOKEN)
                .json(&serde_json::json!({
                    "name": "probe", "label": "Probe", "groupName": "contactinformation",
                    "type": "enumeration", "fieldType": "select", "options": [option],
                }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let without = serde_json::json!({"label": "A", "value": "a", "displayOrder": 0});
    assert_eq!(create(without).await, 400);
    assert!(!fake.has_property("probe"));
    let with = serde_json::json!({"label": "A", "value": "a", "displayOrder": 0, "hidden": false});
    assert_eq!(create(with).await, 201);

    let c = connector(&fake, |cfg| cfg.create_properties = true);
    c.ensure_properties().await.unwrap();
    assert!(fake.has_property("whatsapp_consent"));
}
