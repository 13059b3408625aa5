//! Reading contacts: full syncs past HubSpot's 10,000-result cap and through huge runs of
//! equal timestamps, incremental passes with index lag, edits while paging, and the
//! read-back of our own writes.

use std::time::Duration;

use crate::common::{connector, item, sync};
use optout_core::testkit::records;
use optout_core::{Connector, Status, Timestamp};
use optout_hubspot::fake::{self, FakeOptions, Limits, NewContact};

fn fast() -> FakeOptions {
    FakeOptions {
        limits: Limits::off(),
        ..FakeOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_reads_25000_contacts_with_12000_tied_exactly_once() {
    let fake = fake::start(fast()).await;
    let base = 1_700_000_000_000_i64;
    let tied = base + 6_000_000;
    // 12 of every 25 contacts share one timestamp; the others come in pairs of equal
    // timestamps spread before and after it.
    let ids = fake.create_contacts((0..25_000_i64).map(|i| {
        let at = if i % 25 < 12 {
            tied
        } else {
            base + (i / 2) * 500
        };
        NewContact::new()
            .with("phone", &format!("+1 555 {i:07}"))
            .modified_at(at)
    }));
    assert_eq!(ids.len(), 25_000);

    let c = connector(&fake, |_| {});
    let s = sync(&c, None).await;
    let counts = fake.counts();
    println!(
        "full sync of 25,000 contacts: {} search requests, {} observations",
        counts.search,
        s.records.len()
    );

    assert_eq!(s.distinct_ids().len(), 25_000, "every contact is read");
    assert_eq!(s.records.len(), 25_000, "and none twice");
    assert_eq!(counts.search as usize, s.pages);
    assert!(s.pages <= 135, "{} pages for 25,000 contacts", s.pages);
    assert!(
        s.records
            .iter()
            .all(|r| r.phones.len() == 1 && r.value.is_none())
    );

    // Caught up: the next pass starts shortly before the first request of this one, so it
    // finds nothing (every contact was modified long ago) and does not loop.
    let next = c.poll(Some(&s.cursor)).await.unwrap();
    assert!(next.observations.is_empty() && !next.more);
}

#[tokio::test]
async fn incremental_poll_sees_agent_edits_and_index_lag_within_the_overlap() {
    let fake = fake::start(fast()).await;
    let start = fake.now_ms() - 3_600_000;
    let ids = fake.create_contacts((0..300_i64).map(|i| {
        NewContact::new()
            .with("mobilephone", &format!("+44 7700 9{i:05}"))
            .modified_at(start + i * 1_000)
    }));
    let c = connector(&fake, |cfg| cfg.page_size = 100);
    // The same connector without an overlap, to show the overlap is what catches lagging writes.
    let no_overlap = connector(&fake, |cfg| {
        cfg.page_size = 100;
        cfg.overlap = Duration::ZERO;
    });
    let full = sync(&c, None).await;
    assert_eq!(full.distinct_ids().len(), 300);

    // An agent opts a contact out in HubSpot's UI.
    assert!(fake.edit_contact(&ids[7], &[("whatsapp_consent", "opted_out")]));
    let s = sync(&c, Some(full.cursor.clone())).await;
    let seen = s.last(&ids[7]).expect("the edit is read");
    assert_eq!(seen.value, Some(Status::OptedOut));
    assert_eq!(seen.evidence, "whatsapp_consent=opted_out");
    assert!(
        s.records.len() < 10,
        "an incremental pass reads only recent changes, read {}",
        s.records.len()
    );

    // A write that the search index shows late, followed 30 s later by one shown at once:
    // when the late one appears, it is older than everything the last pass read.
    fake.set_index_lag(Duration::from_secs(3_600));
    assert!(fake.edit_contact(&ids[8], &[("whatsapp_consent", "opted_out")]));
    fake.advance_clock(Duration::from_secs(30));
    fake.set_index_lag(Duration::ZERO);
    assert!(fake.edit_contact(&ids[9], &[("whatsapp_consent", "opted_in")]));

    let before_flush = sync(&c, Some(s.cursor.clone())).await;
    let before_flush_0 = sync(&no_overlap, Some(s.cursor.clone())).await;
    for b in [&before_flush, &before_flush_0] {
        assert_eq!(b.last(&ids[9]).unwrap().value, Some(Status::OptedIn));
        assert!(b.last(&ids[8]).is_none(), "not searchable yet");
    }

    fake.flush_index();
    let after = sync(&c, Some(before_flush.cursor)).await;
    assert_eq!(
        after.last(&ids[8]).map(|r| r.value),
        Some(Some(Status::OptedOut)),
        "the overlap re-reads the lagging write"
    );
    let after_0 = sync(&no_overlap, Some(before_flush_0.cursor)).await;
    assert!(
        after_0.last(&ids[8]).is_none(),
        "without an overlap the lagging write is missed"
    );
}

#[tokio::test]
async fn records_modified_while_paging_are_not_skipped() {
    let fake = fake::start(fast()).await;
    let start = fake.now_ms() - 3_600_000;
    let ids = fake.create_contacts((0..1_000_i64).map(|i| {
        NewContact::new()
            .with("phone", &format!("555{i:04}"))
            .modified_at(start + i)
    }));
    let c = connector(&fake, |cfg| cfg.page_size = 100);

    let first = c.poll(None).await.unwrap();
    assert_eq!(first.observations.len(), 100);
    assert!(first.more);
    // One contact already read and one not yet read change while we page. Both move to
    // the end of the order; with offset paging the first move would shift an unread
    // contact below the next offset.
    fake.edit_contact(&ids[10], &[("whatsapp_consent", "opted_out")]);
    fake.edit_contact(&ids[500], &[("whatsapp_consent", "opted_in")]);

    let rest = sync(&c, Some(first.cursor)).await;
    let mut all: Vec<String> = records(first.observations)
        .into_iter()
        .map(|r| r.record)
        .collect();
    all.extend(rest.records.iter().map(|r| r.record.clone()));
    let distinct: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!(distinct.len(), 1_000, "no contact is skipped");
    assert_eq!(
        all.len(),
        1_001,
        "only the contact edited after it was read comes twice"
    );
    assert_eq!(rest.last(&ids[10]).unwrap().value, Some(Status::OptedOut));
    assert_eq!(rest.last(&ids[500]).unwrap().value, Some(Status::OptedIn));
    let p = c.poll(Some(&rest.cursor)).await.unwrap();
    assert!(p.progress.is_some());
}

#[tokio::test]
async fn a_pushed_value_reads_back_as_written() {
    // Recognising this read-back as the echo of our own push is the core's job (it keeps
    // the last pushed value per record); the connector reports what HubSpot holds.
    let fake = fake::start(fast()).await;
    let id = fake.create_contact(&[("phone", "+1 (555) 010-0001")]);
    let c = connector(&fake, |_| {});
    let full = sync(&c, None).await;
    assert_eq!(full.last(&id).unwrap().value, None);
    assert_eq!(full.last(&id).unwrap().evidence, "whatsapp_consent=");

    let changed_at = Timestamp::parse("2025-07-07T20:27:17.947Z").unwrap();
    let before = fake.now_ms();
    let out = c
        .push(&[item(&id, Status::OptedOut, changed_at)])
        .await
        .unwrap();
    assert_eq!(out, vec![optout_core::PushOutcome::Done]);
    assert_eq!(
        fake.property(&id, "whatsapp_consent_changed_at").as_deref(),
        Some("2025-07-07T20:27:17.947Z")
    );
    assert_eq!(
        fake.property(&id, "whatsapp_consent_source").as_deref(),
        Some("whatsapp:keyword")
    );

    let back = sync(&c, Some(full.cursor)).await;
    let r = back
        .last(&id)
        .expect("our own write comes back through search");
    assert_eq!(r.value, Some(Status::OptedOut));
    assert_eq!(
        r.changed_at,
        Some(changed_at),
        "the change time we wrote, not the modification time"
    );
    assert!(
        r.modified_at.millis() >= before,
        "the write moved lastmodifieddate"
    );
    assert_eq!(
        r.phones,
        vec!["+1 (555) 010-0001".to_string()],
        "phones are reported raw"
    );
    assert_eq!(r.evidence, "whatsapp_consent=opted_out");
}
