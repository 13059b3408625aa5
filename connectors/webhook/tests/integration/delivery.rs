//! The connector over real HTTP against the fake receiver on 127.0.0.1: signing,
//! outcome classification, retries and deduplication, an unreachable endpoint, and
//! secrets kept out of every printed form.

use std::time::Duration;

use optout_core::testkit::{push_item, secret_file};
use optout_core::{
    Connector, ConnectorError, Cursor, Identity, PushItem, PushOutcome, Scope, SecretRef, Status,
    Timestamp,
};
use optout_webhook::fake::{self, FakeHandle, FakeOptions, Fault, FaultRates};
use optout_webhook::{Config, WebhookConnector, event_id, verify_signature};

const HMAC_KEY: &str = "whsec-test-key-0123456789";
const BEARER: &str = "bearer-test-token-abcdef";

struct Setup {
    fake: FakeHandle,
    _secrets: tempfile::TempDir,
}

async fn receiver() -> FakeHandle {
    fake::start(FakeOptions {
        secret: HMAC_KEY.as_bytes().to_vec(),
        ..FakeOptions::default()
    })
    .await
}

/// A connector for `url` with a file-referenced key (in the returned directory); `tune`
/// adjusts the config.
fn connector(url: &str, tune: impl FnOnce(&mut Config)) -> (WebhookConnector, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(url, secret_file(dir.path(), HMAC_KEY));
    config.timeout = Duration::from_secs(5);
    tune(&mut config);
    (WebhookConnector::new("hooks", config).unwrap(), dir)
}

async fn setup(tune: impl FnOnce(&mut Config)) -> (WebhookConnector, Setup) {
    let fake = receiver().await;
    let (c, secrets) = connector(&fake.url(), tune);
    (
        c,
        Setup {
            fake,
            _secrets: secrets,
        },
    )
}

fn item(subject: &str, status: Status, at: i64) -> PushItem {
    PushItem {
        key: format!("{subject}:all"),
        subject: subject.into(),
        identities: vec![
            Identity::Phone("+15551230001".into()),
            Identity::WaId("15551230001".into()),
            Identity::Bsuid("US.13491208655302741918".into()),
        ],
        ..push_item(subject, status, Timestamp(at))
    }
}

fn items(n: usize) -> Vec<PushItem> {
    (0..n)
        .map(|i| {
            item(
                &format!("s{i}"),
                Status::OptedOut,
                1_751_920_000_000 + i as i64,
            )
        })
        .collect()
}

#[tokio::test]
async fn events_arrive_signed_and_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let token = secret_file(dir.path(), BEARER);
    let (c, s) = setup(|cfg| {
        cfg.bearer_token = Some(token);
        cfg.headers.insert("X-Tenant".into(), "acme".into());
    })
    .await;
    let mut batch = items(3);
    batch[1].status = Status::OptedIn;
    batch[2].scope = Scope::Marketing;

    let before = chrono::Utc::now().timestamp();
    let outcomes = c.push(&batch).await.unwrap();
    let after = chrono::Utc::now().timestamp();
    assert_eq!(outcomes, vec![PushOutcome::Done; 3]);
    let counters = s.fake.counters();
    assert_eq!(
        (
            counters.hook_requests,
            counters.accepted,
            counters.bad_signatures
        ),
        (3, 3, 0)
    );

    let mut deliveries = s.fake.deliveries();
    deliveries.sort_by(|a, b| a.event.subject.cmp(&b.event.subject));
    for (d, it) in deliveries.iter().zip(&batch) {
        let h = |name: &str| d.headers.get(name).map(String::as_str).unwrap_or("");
        // The documented scheme, checked here from the raw request.
        let ts = h("x-optout-timestamp");
        assert!(verify_signature(
            HMAC_KEY.as_bytes(),
            ts,
            &d.body,
            h("x-optout-signature-256")
        ));
        assert!(!verify_signature(
            b"another key",
            ts,
            &d.body,
            h("x-optout-signature-256")
        ));
        let ts: i64 = ts.parse().unwrap();
        assert!(
            ts >= before && ts <= after,
            "timestamp {ts} outside [{before}, {after}]"
        );
        assert_eq!(h("content-type"), "application/json");
        assert_eq!(h("x-optout-event-id"), event_id(it));
        assert_eq!(h("authorization"), format!("Bearer {BEARER}"));
        assert_eq!(h("x-tenant"), "acme");

        let json: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
        assert_eq!(json["type"], "consent.changed");
        assert_eq!(json["id"], event_id(it));
        assert_eq!(json["subject"], it.subject);
        assert_eq!(json["scope"], it.scope.as_str());
        assert_eq!(json["status"], it.status.as_str());
        assert_eq!(json["changed_at"], it.changed_at.to_rfc3339());
        assert_eq!(json["source"], "whatsapp:keyword");
        assert_eq!(
            json["identities"]["phones"],
            serde_json::json!(["+15551230001"])
        );
        assert_eq!(
            json["identities"]["wa_ids"],
            serde_json::json!(["15551230001"])
        );
        assert_eq!(
            json["identities"]["bsuids"],
            serde_json::json!(["US.13491208655302741918"])
        );
        let sent = Timestamp::parse(json["sent_at"].as_str().unwrap()).unwrap();
        assert_eq!(
            sent.millis().div_euclid(1000),
            ts,
            "sent_at and the signed timestamp agree"
        );
    }
}

#[tokio::test]
async fn a_wrong_key_is_refused_by_the_receiver_and_rejected() {
    let fake = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let config = Config::new(fake.url(), secret_file(dir.path(), "not-the-receivers-key"));
    let c = WebhookConnector::new("hooks", config).unwrap();
    let outcomes = c.push(&items(1)).await.unwrap();
    match &outcomes[..] {
        [PushOutcome::Rejected { reason }] => {
            assert!(
                reason.contains("401") && reason.contains("bad or stale signature"),
                "{reason}"
            )
        }
        other => panic!("expected one rejection, got {other:?}"),
    }
    assert_eq!(fake.counters().bad_signatures, 1);
    assert!(fake.events().is_empty());
}

#[tokio::test]
async fn server_errors_and_429_are_retried_and_delivered_once() {
    let (c, s) = setup(|_| {}).await;
    let batch = items(1);
    s.fake.script([
        Fault::ServerError,
        Fault::TooManyRequests {
            retry_after_secs: 7,
        },
    ]);

    match &c.push(&batch).await.unwrap()[..] {
        [
            PushOutcome::RetryLater {
                after: None,
                reason,
            },
        ] => assert!(reason.contains("500"), "{reason}"),
        other => panic!("expected a retry after a 500, got {other:?}"),
    }
    match &c.push(&batch).await.unwrap()[..] {
        [PushOutcome::RetryLater { after, reason }] => {
            assert_eq!(*after, Some(Duration::from_secs(7)));
            assert!(reason.contains("429"), "{reason}");
        }
        other => panic!("expected a retry after a 429, got {other:?}"),
    }
    assert_eq!(c.push(&batch).await.unwrap(), vec![PushOutcome::Done]);
    // A retry of an item that was in fact delivered is harmless: receivers dedupe by id.
    assert_eq!(c.push(&batch).await.unwrap(), vec![PushOutcome::Done]);

    assert_eq!(s.fake.counters().hook_requests, 4);
    assert_eq!(s.fake.deliveries().len(), 2);
    let events = s.fake.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id, event_id(&batch[0]));
}

#[tokio::test]
async fn a_429_holds_back_the_rest_of_the_batch() {
    let (c, s) = setup(|cfg| cfg.concurrency = 1).await;
    let batch = items(5);
    s.fake.script([Fault::TooManyRequests {
        retry_after_secs: 3,
    }]);

    let outcomes = c.push(&batch).await.unwrap();
    assert_eq!(outcomes.len(), 5);
    for o in &outcomes {
        assert!(
            matches!(o, PushOutcome::RetryLater { after: Some(d), .. } if *d == Duration::from_secs(3)),
            "{o:?}"
        );
    }
    // Only the first request was sent; the other four were held back.
    assert_eq!(s.fake.counters().hook_requests, 1);

    assert_eq!(c.push(&batch).await.unwrap(), vec![PushOutcome::Done; 5]);
    assert_eq!(s.fake.counters().hook_requests, 6);
    let mut ids: Vec<String> = s.fake.events().into_iter().map(|e| e.id).collect();
    ids.sort();
    let mut want: Vec<String> = batch.iter().map(event_id).collect();
    want.sort();
    assert_eq!(ids, want);
}

#[tokio::test]
async fn a_timeout_is_retried_and_the_duplicate_dedupes() {
    let (c, s) = setup(|cfg| {
        // Long enough for a loaded debug build, short enough to keep the test quick.
        cfg.timeout = Duration::from_secs(1);
        cfg.concurrency = 1;
    })
    .await;
    let batch = items(2);
    // The receiver records the first event, then answers too late.
    s.fake.script([Fault::Slow(Duration::from_secs(5))]);

    let outcomes = c.push(&batch).await.unwrap();
    match &outcomes[..] {
        [
            PushOutcome::RetryLater {
                after: None,
                reason,
            },
            PushOutcome::Done,
        ] => {
            assert!(reason.contains("no answer within 1s"), "{reason}")
        }
        other => panic!("expected [retry, done], got {other:?}"),
    }
    assert_eq!(c.push(&batch[..1]).await.unwrap(), vec![PushOutcome::Done]);
    assert_eq!(
        s.fake.deliveries().len(),
        3,
        "the timed-out request was received too"
    );
    assert_eq!(
        s.fake.events().len(),
        2,
        "but the deduplicated view holds each event once"
    );
}

#[tokio::test]
async fn a_dropped_connection_is_retried() {
    let (c, s) = setup(|cfg| cfg.concurrency = 1).await;
    let batch = items(2);
    s.fake.script([Fault::Drop]);
    let outcomes = c.push(&batch).await.unwrap();
    match &outcomes[0] {
        PushOutcome::RetryLater {
            after: None,
            reason,
        } => {
            assert!(reason.contains("connection closed"), "{reason}")
        }
        other => panic!("expected a retry, got {other:?}"),
    }
    assert_eq!(outcomes[1], PushOutcome::Done);
    assert_eq!(c.push(&batch[..1]).await.unwrap(), vec![PushOutcome::Done]);
    assert_eq!(s.fake.events().len(), 2);
    assert_eq!(s.fake.counters().hook_requests, 3);
}

#[tokio::test]
async fn gone_and_missing_endpoints_are_rejected() {
    let (c, s) = setup(|_| {}).await;
    s.fake.script([Fault::Gone]);
    match &c.push(&items(1)).await.unwrap()[..] {
        [PushOutcome::Rejected { reason }] => {
            assert!(
                reason.contains("410") && reason.contains("gone"),
                "{reason}"
            )
        }
        other => panic!("expected a rejection, got {other:?}"),
    }

    let (missing, _files) = connector(&format!("{}/no-such-hook", s.fake.base_url()), |_| {});
    match &missing.push(&items(1)).await.unwrap()[..] {
        [PushOutcome::Rejected { reason }] => assert!(reason.contains("404"), "{reason}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(s.fake.events().is_empty());
    assert_eq!(s.fake.counters().requests, 2);
}

#[tokio::test]
async fn an_unreachable_endpoint_fails_the_whole_batch_without_leaking() {
    // A port that was free a moment ago: connections are refused.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/hooks/catch/PATHTOKEN123/?key=QUERYTOKEN456");
    let dir = tempfile::tempdir().unwrap();
    let token = secret_file(dir.path(), BEARER);
    let (c, _files) = connector(&url, |cfg| cfg.bearer_token = Some(token));

    let err = c.push(&items(20)).await.unwrap_err();
    assert!(matches!(err, ConnectorError::Transient(_)), "{err:?}");
    assert!(err.is_retryable());
    let shown = format!("{err} {err:?} {c:?} {:?}", c.health().await);
    assert!(
        shown.contains("127.0.0.1") && shown.contains("could not connect"),
        "{shown}"
    );
    for secret in [HMAC_KEY, BEARER, "PATHTOKEN123", "QUERYTOKEN456"] {
        assert!(!shown.contains(secret), "{secret} leaked in: {shown}");
    }
}

#[tokio::test]
async fn construction_errors_name_the_problem_not_the_secret() {
    let mut config = Config::new(
        "https://hooks.example.com/x",
        SecretRef::Env("OPTOUT_WEBHOOK_SURELY_UNSET".into()),
    );
    let err = WebhookConnector::new("hooks", config.clone()).unwrap_err();
    assert!(
        matches!(err, ConnectorError::Config(ref m) if m.contains("OPTOUT_WEBHOOK_SURELY_UNSET")),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    config.secret = secret_file(dir.path(), HMAC_KEY);
    config
        .headers
        .insert("Authorization".into(), "Bearer inline-secret".into());
    let err = WebhookConnector::new("hooks", config).unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(
        shown.contains("headers.Authorization") && shown.contains("bearer_token"),
        "{shown}"
    );
    assert!(
        !shown.contains("inline-secret") && !shown.contains(HMAC_KEY),
        "{shown}"
    );
}

#[tokio::test]
async fn poll_is_empty_and_health_shows_only_the_host() {
    let (c, s) = setup(|cfg| cfg.batch_size = 20).await;
    let page = c.poll(None).await.unwrap();
    assert!(page.observations.is_empty() && !page.more);
    let cursor = Cursor("kept".into());
    let page = c.poll(Some(&cursor)).await.unwrap();
    assert_eq!((page.cursor, page.more), (cursor, false));
    assert_eq!(c.max_batch(), 20);
    assert_eq!(c.push(&[]).await.unwrap(), vec![]);

    let health = c.health().await;
    assert!(
        health.ok && health.detail.contains("127.0.0.1"),
        "{health:?}"
    );
    assert!(!health.detail.contains("/hook"), "{health:?}");
    assert_eq!(
        s.fake.counters().requests,
        0,
        "neither poll nor health sends a request"
    );
}

/// The core's loop in miniature: push what is pending until everything is done, against
/// a receiver failing 40% of requests in every way it can. Every event ends up delivered,
/// and exactly once in the deduplicated view.
#[tokio::test]
async fn random_faults_end_with_every_event_delivered_once() {
    let (c, s) = setup(|cfg| cfg.timeout = Duration::from_secs(1)).await;
    s.fake.set_rates(FaultRates {
        server_error: 0.1,
        too_many_requests: 0.1,
        slow: 0.05,
        drop: 0.1,
        gone: 0.0,
        retry_after_secs: 0,
        slow_for: Duration::from_secs(3),
    });
    let batch = items(40);
    let mut pending: Vec<PushItem> = batch.clone();
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        assert!(
            rounds <= 60,
            "not done after 60 rounds: {} pending",
            pending.len()
        );
        let Ok(outcomes) = c.push(&pending).await else {
            continue;
        };
        let mut next = Vec::new();
        for (it, o) in pending.iter().zip(outcomes) {
            match o {
                PushOutcome::Done => {}
                PushOutcome::RetryLater { .. } => next.push(it.clone()),
                PushOutcome::Rejected { reason } => panic!("rejected: {reason}"),
            }
        }
        pending = next;
    }
    let counters = s.fake.counters();
    eprintln!("40 events in {rounds} rounds: {counters:?}");
    assert_eq!(s.fake.events().len(), 40);
    assert!(counters.faults > 0, "the receiver injected faults");
    assert!(counters.hook_requests > 40);
    assert_eq!(counters.bad_signatures, 0);
}
