//! Writing consent values through batch update: one request for many contacts, per-contact
//! outcomes of partial failures, whole-batch refusals, and the request count of a large
//! suppression push.

use crate::common::{connector, item, sync};
use optout_core::{Connector, ConnectorError, PushOutcome, Status, Timestamp};
use optout_hubspot::fake::{self, FakeOptions, Faults, Limits, NewContact};

fn fast() -> FakeOptions {
    FakeOptions {
        limits: Limits::off(),
        ..FakeOptions::default()
    }
}

fn at() -> Timestamp {
    Timestamp::parse("2026-01-15T09:30:00.000Z").unwrap()
}

#[tokio::test]
async fn an_opt_out_for_a_number_on_three_contacts_is_one_request() {
    let fake = fake::start(fast()).await;
    // One person's number, typed three ways into three contacts' different phone fields.
    let a = fake.create_contact(&[("phone", "+1 (555) 010-0001")]);
    let b = fake.create_contact(&[("mobilephone", "15550100001")]);
    let d = fake.create_contact(&[
        ("hs_whatsapp_phone_number", "+1 555 010 0001"),
        ("phone", "555-0100"),
    ]);
    let other = fake.create_contact(&[("phone", "+1 555 010 0002")]);
    let c = connector(&fake, |_| {});

    // The connector reports every phone raw; linking the three is the core's job.
    let s = sync(&c, None).await;
    assert_eq!(s.last(&a).unwrap().phones, ["+1 (555) 010-0001"]);
    assert_eq!(s.last(&b).unwrap().phones, ["15550100001"]);
    assert_eq!(s.last(&d).unwrap().phones, ["555-0100", "+1 555 010 0001"]);

    fake.reset_counts();
    let batch: Vec<_> = [&a, &b, &d]
        .iter()
        .map(|id| item(id, Status::OptedOut, at()))
        .collect();
    let out = c.push(&batch).await.unwrap();
    assert_eq!(out, vec![PushOutcome::Done; 3]);
    assert_eq!(
        fake.counts().batch_update,
        1,
        "one batch request for all three"
    );
    for id in [&a, &b, &d] {
        assert_eq!(
            fake.property(id, "whatsapp_consent").as_deref(),
            Some("opted_out")
        );
    }
    assert_eq!(fake.property(&other, "whatsapp_consent"), None);
}

#[tokio::test]
async fn a_deleted_contact_is_rejected_while_the_rest_are_done() {
    let fake = fake::start(fast()).await;
    let ids = fake.create_contacts(
        (0..5).map(|i| NewContact::new().with("phone", &format!("+3161234567{i}"))),
    );
    assert!(fake.delete_contact(&ids[2]));
    let c = connector(&fake, |_| {});

    let mut batch: Vec<_> = ids
        .iter()
        .map(|id| item(id, Status::OptedOut, at()))
        .collect();
    // The same contact twice (two scopes of one subject): HubSpot refuses duplicate ids in a
    // batch, so it is sent once and both items share the outcome.
    batch.push(item(&ids[0], Status::OptedOut, at()));
    let out = c.push(&batch).await.unwrap();

    assert_eq!(fake.counts().batch_update, 1);
    assert_eq!(out.len(), 6);
    for i in [0, 1, 3, 4, 5] {
        assert_eq!(out[i], PushOutcome::Done, "item {i}");
    }
    match &out[2] {
        PushOutcome::Rejected { reason } => {
            assert!(
                reason.contains(&format!("contact {} does not exist", ids[2])),
                "{reason}"
            );
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    for i in [0, 1, 3, 4] {
        assert_eq!(
            fake.property(&ids[i], "whatsapp_consent").as_deref(),
            Some("opted_out")
        );
    }

    // A value the portal's property does not offer: HubSpot refuses the whole request, and
    // the connector says it is the configuration (an alarm), naming the property, without
    // splitting the batch.
    let misconfigured = connector(&fake, |cfg| cfg.opted_in_value = "subscribed".into());
    fake.reset_counts();
    let e = misconfigured
        .push(&[
            item(&ids[1], Status::OptedIn, at()),
            item(&ids[3], Status::OptedIn, at()),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ConnectorError::Config(m) if m.contains("INVALID_OPTION") && m.contains("whatsapp_consent") && m.contains("opted_in_value")),
        "{e}"
    );
    assert!(e.is_alarm());
    assert_eq!(fake.counts().batch_update, 1, "not split");
    assert_eq!(
        fake.property(&ids[1], "whatsapp_consent").as_deref(),
        Some("opted_out"),
        "nothing written"
    );
}

#[tokio::test]
async fn a_batch_refused_as_a_whole_is_split_until_only_the_bad_contact_is_rejected() {
    let fake = fake::start(fast()).await;
    let ids = fake.create_contacts(
        (0..100).map(|i| NewContact::new().with("phone", &format!("+4915112345{i:03}"))),
    );
    fake.poison(&ids[37]);
    let c = connector(&fake, |_| {});

    let batch: Vec<_> = ids
        .iter()
        .map(|id| item(id, Status::OptedOut, at()))
        .collect();
    let out = c.push(&batch).await.unwrap();
    let requests = fake.counts().batch_update;
    println!("one bad contact among 100: {requests} batch requests");

    for (i, o) in out.iter().enumerate() {
        if i == 37 {
            assert!(
                matches!(o, PushOutcome::Rejected { reason } if reason.contains(&ids[37])),
                "{o:?}"
            );
        } else {
            assert_eq!(*o, PushOutcome::Done, "item {i}");
        }
    }
    assert_eq!(
        ids.iter()
            .filter(|id| fake.property(id, "whatsapp_consent").is_some())
            .count(),
        99
    );
    assert!(
        requests <= 15,
        "{requests} requests to isolate one bad contact"
    );
}

#[tokio::test]
async fn pushing_10000_suppressions_takes_at_most_105_requests() {
    let fake = fake::start(fast()).await;
    let ids = fake.create_contacts(
        (0..10_000).map(|i| NewContact::new().with("phone", &format!("+2771{i:07}"))),
    );
    let c = connector(&fake, |_| {});
    assert_eq!(c.max_batch(), 100);
    // Three server errors on the way, retried like the daemon's push worker retries.
    fake.set_faults(Faults {
        error_next: 3,
        error_status: 502,
        ..Faults::default()
    });

    let items: Vec<_> = ids
        .iter()
        .map(|id| item(id, Status::OptedOut, at()))
        .collect();
    let mut failures = 0;
    for chunk in items.chunks(c.max_batch()) {
        loop {
            match c.push(chunk).await {
                Ok(out) => {
                    assert!(out.iter().all(|o| *o == PushOutcome::Done));
                    break;
                }
                Err(e) => {
                    assert!(e.is_retryable(), "{e}");
                    failures += 1;
                }
            }
        }
    }
    let requests = fake.counts().batch_update;
    println!(
        "10,000 suppressions: {requests} batch-update requests ({failures} failed and retried)"
    );
    assert_eq!(failures, 3);
    assert!(requests <= 105, "{requests} requests");
    assert!(
        ids.iter()
            .all(|id| fake.property(id, "whatsapp_consent").as_deref() == Some("opted_out"))
    );
}
