//! The store's behaviour, on either engine: reopening, schema checks, transactions, the
//! inbox and its group commit, retention and the gate's reads.

use super::*;
use crate::identity::Normalizer;
use crate::policy::PolicyConfig;
use crate::reconcile::{Engine, Takes};
use optout_core::{Observation, RecordSnapshot, Status};
use std::collections::BTreeMap;
use std::ops::Bound;

on_both!(
    reopen_keeps_committed_state,
    aborted_transaction_leaves_nothing,
    a_newer_schema_version_is_refused_without_changes,
    data_without_schema_version_is_refused,
    unknown_value_format_is_a_clear_error,
    counts_follow_decisions,
    the_gate_read_follows_merges_and_decodes_only_the_registers,
    ranges_and_prefixes_follow_byte_order,
);

on_both_async!(
    inbox_sequence_numbers_start_above_zero,
    concurrent_appends_are_all_stored,
    a_failing_store_refuses_work_until_recovered,
    reopening_keeps_durable_data_and_ordering,
    retention_prunes_only_what_is_older_than_the_cutoff,
    append_rate_with_32_appenders,
    many_inbox_entries_read_back_in_order,
);

/// Records per page of [`page`].
pub(super) const PAGE: usize = 40;

pub(super) fn engine_over(store: Store) -> Engine {
    Engine::new(
        store,
        PolicyConfig::default(),
        Normalizer::new(Normalizer::parse_region("US").unwrap()),
        BTreeMap::from([("crm".to_string(), Takes::Records)]),
    )
}

/// Page `n` of a CRM's records: [`PAGE`] opted-out people of their own.
pub(super) fn page(n: usize) -> Vec<Observation> {
    (0..PAGE)
        .map(|i| {
            Observation::Record(RecordSnapshot {
                record: format!("rec-{n}-{i}"),
                phones: vec![format!("+14155{:06}", n * PAGE + i)],
                value: Some(Status::OptedOut),
                marketing: None,
                changed_at: None,
                modified_at: Timestamp::from_secs(1_700_000_000 + n as i64),
                evidence: "consent=opted_out".into(),
            })
        })
        .collect()
}

fn reopen_keeps_committed_state(o: &Opener) {
    {
        let s = o.open();
        s.transaction(true, |tx| {
            tx.set_cursor("hubspot", "c-1")?;
            tx.count("all:opted_out", 3)?;
            tx.count("all:opted_out", 2)?;
            Ok(())
        })
        .unwrap();
    }
    let s = o.open();
    assert_eq!(s.cursor("hubspot").unwrap().as_deref(), Some("c-1"));
    assert_eq!(s.counts().unwrap(), vec![("all:opted_out".to_string(), 5)]);
}

fn aborted_transaction_leaves_nothing(o: &Opener) {
    let s = o.open();
    let r: Result<(), _> = s.transaction(true, |tx| {
        tx.set_cursor("hubspot", "c-1")?;
        tx.count("all:opted_out", 1)?;
        Err(StoreError::Io("injected".into()).into())
    });
    assert!(r.is_err());
    assert_eq!(s.cursor("hubspot").unwrap(), None);
    assert_eq!(s.counts().unwrap(), vec![]);
    // An abort of the caller's is not a failing store.
    assert_eq!(s.failure(), None);
}

fn a_newer_schema_version_is_refused_without_changes(o: &Opener) {
    {
        let s = o.open();
        s.transaction(true, |tx| tx.set_cursor("hubspot", "keep-me"))
            .unwrap();
        s.tree(META, |t| t.insert("schema_version", "99")).unwrap();
        s.flush_blocking().unwrap();
    }
    let before = o.raw_get(CURSORS, b"hubspot").expect("the cursor");
    let err = o.try_open().err().expect("refused");
    assert!(matches!(err, StoreError::Schema { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("schema version 99") && msg.contains(&format!("understands {SCHEMA_VERSION}")),
        "{msg}"
    );
    assert_eq!(o.raw_get(CURSORS, b"hubspot"), Some(before));
    assert_eq!(
        o.raw_get(META, b"schema_version").as_deref(),
        Some(&b"99"[..])
    );
}

fn data_without_schema_version_is_refused(o: &Opener) {
    {
        let s = o.open();
        s.tree(META, |t| t.remove("schema_version")).unwrap();
        s.tree(SUBJECTS, |t| t.insert("x", "y")).unwrap();
        s.flush_blocking().unwrap();
    }
    let err = o.try_open().err().expect("refused");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert_eq!(o.raw_get(SUBJECTS, b"x").as_deref(), Some(&b"y"[..]));
}

fn unknown_value_format_is_a_clear_error(o: &Opener) {
    let s = o.open();
    let mut v = vec![42u8];
    v.extend_from_slice(b"{}");
    s.tree(SUBJECTS, |t| t.insert(7u64.to_be_bytes(), v))
        .unwrap();
    let err = s.subject(7).unwrap_err().to_string();
    assert!(err.contains("value format 42"), "{err}");
}

fn counts_follow_decisions(o: &Opener) {
    let e = engine_over(o.open());
    let r = e
        .apply_page("crm", &page(0), Some("0"), Timestamp::now())
        .unwrap();
    assert_eq!(r.decisions.len(), PAGE);
    assert_eq!(
        e.store().counts().unwrap(),
        vec![
            ("all:opted_out".to_string(), PAGE as i64),
            ("people".to_string(), PAGE as i64)
        ]
    );
    assert_eq!(e.store().cursor("crm").unwrap().as_deref(), Some("0"));
    assert_eq!(e.store().subject_count(), PAGE);
}

fn the_gate_read_follows_merges_and_decodes_only_the_registers(o: &Opener) {
    let s = o.open();
    let mut consent = Consent::default();
    consent.record(&crate::policy::Fact {
        status: Status::OptedOut,
        scope: optout_core::Scope::All,
        at: Timestamp(1_700_000_000_000),
        source: "whatsapp".into(),
        record: "wamid.1".into(),
        signal: optout_core::Signal::Keyword,
        evidence: "STOP".into(),
    });
    let merged = SubjectRecord {
        id: 1,
        aliases: vec!["p:+14155550001".into()],
        merged_into: Some(2),
        ..SubjectRecord::default()
    };
    let live = SubjectRecord {
        id: 2,
        aliases: vec!["p:+14155550002".into()],
        consent: consent.clone(),
        links: vec![("hubspot".into(), "c-1".into())],
        merged_from: vec![1],
        ..SubjectRecord::default()
    };
    s.transaction(true, |tx| {
        tx.put_subject(&merged)?;
        tx.put_subject(&live)?;
        tx.put_alias("p:+14155550001", 1)?;
        tx.put_alias("p:+14155550002", 2)
    })
    .unwrap();
    let want = Some((2, consent));
    assert_eq!(s.consent_by_alias("p:+14155550001").unwrap(), want);
    let both = s
        .consent_reads(|r| {
            ["p:+14155550002", "p:+19995550000"].map(|a| r.consent_by_alias(a).unwrap())
        })
        .unwrap();
    assert_eq!(both, [want, None]);
    assert_eq!(
        s.subject_by_alias("p:+14155550001")
            .unwrap()
            .map(|s| s.consent),
        both[0].clone().map(|(_, c)| c)
    );
}

/// Both engines order keys bytewise, and ranges, prefixes and `last` agree on the edges
/// (bytes 0x00 and 0xFF, inclusive and exclusive ends, more than one page of rows).
fn ranges_and_prefixes_follow_byte_order(o: &Opener) {
    let s = o.open();
    let keys: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0, 0],
        vec![1],
        b"a".to_vec(),
        b"a\0".to_vec(),
        b"a\0b".to_vec(),
        b"a\x01".to_vec(),
        b"ab".to_vec(),
        vec![0x7f],
        vec![0x80],
        vec![0xff],
        vec![0xff, 0xff],
        vec![0xff, 0xff, 0x00],
    ];
    for k in keys.iter().rev() {
        s.tree(SEEN, |t| t.insert(k, [k.len() as u8])).unwrap();
    }
    let all = |it: KvIter| -> Vec<Vec<u8>> { it.map(|kv| kv.unwrap().0.to_vec()).collect() };
    s.tree(SEEN, |t| {
        assert_eq!(all(t.iter()), keys);
        assert_eq!(all(t.range(b"a".to_vec()..b"ab".to_vec())), keys[4..8]);
        assert_eq!(all(t.range(b"a".to_vec()..=b"ab".to_vec())), keys[4..9]);
        let after_a = (Bound::Excluded(b"a".to_vec()), Bound::Unbounded::<Vec<u8>>);
        assert_eq!(all(t.range(after_a)), keys[5..]);
        assert_eq!(all(t.scan_prefix(b"a\0")), keys[5..7]);
        assert_eq!(all(t.scan_prefix([0xff, 0xff])), keys[12..]);
        assert_eq!(all(t.scan_prefix([])), keys);
        assert_eq!(&*t.last().unwrap().unwrap().0, &[0xff, 0xff, 0x00]);
        assert_eq!(t.len().unwrap(), keys.len());
        assert!(t.compare_and_swap(b"ab", Some(&[2]), Some(&[9])).unwrap());
        assert!(!t.compare_and_swap(b"ab", Some(&[2]), None).unwrap());
        assert!(!t.compare_and_swap(b"ab", None, Some(&[1])).unwrap());
        assert!(t.compare_and_swap(b"new", None, Some(&[1])).unwrap());
        assert!(t.compare_and_swap(b"new", Some(&[1]), None).unwrap());
        assert_eq!(t.get(b"ab").unwrap().as_deref(), Some(&[9][..]));
        assert_eq!(t.get(b"new").unwrap().as_deref(), None);
    });
    // Over several of PostgreSQL's pages (1000 rows a round trip).
    for i in 0..2500u32 {
        s.tree(QUARANTINE, |t| t.insert(i.to_be_bytes(), [1]))
            .unwrap();
    }
    s.tree(QUARANTINE, |t| {
        let got: Vec<u32> = (t.range(1u32.to_be_bytes()..2400u32.to_be_bytes()))
            .map(|kv| u32::from_be_bytes(kv.unwrap().0[..].try_into().unwrap()))
            .collect();
        assert_eq!(got, (1..2400).collect::<Vec<_>>());
        assert!(!t.is_empty().unwrap());
    });
    assert!(s.tree(HOLDS, |t| t.is_empty()).unwrap());
}

async fn inbox_sequence_numbers_start_above_zero(o: &Opener) {
    // A cursor of 0 means "nothing read"; an entry numbered 0 would never be read.
    let s = o.open();
    let seq = s.inbox_append(Timestamp::now(), b"{}").await.unwrap();
    assert!(seq > 0);
    assert_eq!(s.inbox_after(0, 10).unwrap().len(), 1);
}

/// Concurrent appends share flushes (group commit) and every one is durable and distinct.
async fn concurrent_appends_are_all_stored(o: &Opener) {
    let s = o.open();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                seqs.push(
                    s.inbox_append(Timestamp::now(), format!("{t}-{i}").as_bytes())
                        .await
                        .unwrap(),
                );
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 400);
    assert_eq!(s.inbox_len(), 400);
    let read: Vec<u64> = (s.inbox_after(0, 1000).unwrap().into_iter())
        .map(|(seq, _)| seq)
        .collect();
    assert_eq!(read, all);
    assert!(s.shared.group.flushed.load(SeqCst) >= 400);
}

/// A failure of the engine's own marks the store failing: every call answers at once
/// without touching the engine, until `recover` proves it works (the probe succeeds).
async fn a_failing_store_refuses_work_until_recovered(o: &Opener) {
    let s = o.open();
    let seq = s.inbox_append(Timestamp(1), b"{}").await.unwrap();
    let health = s.health();
    s.note(&StoreError::Io(
        "No space left on device (os error 28)".into(),
    ));
    assert!(health.has_changed().unwrap());
    assert!(s.failure().unwrap().contains("No space left"));
    let err = s.inbox_append(Timestamp(2), b"{}").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(matches!(
        s.inbox_after(0, 10),
        Err(StoreError::Unavailable(_))
    ));
    // A bad value of ours is not a failing store.
    s.note(&StoreError::Corrupt("a bad value".into()));
    assert!(s.failure().unwrap().contains("No space left"));

    tokio::task::spawn_blocking({
        let s = s.clone();
        move || s.recover()
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(s.failure(), None);
    let next = s.inbox_append(Timestamp(3), b"{}").await.unwrap();
    assert!(next > seq);
    assert_eq!(s.inbox_after(0, 10).unwrap().len(), 2);
}

/// Reopening in the process keeps everything made durable and numbers new entries after
/// the old ones (the WhatsApp poll's cursor stays valid).
async fn reopening_keeps_durable_data_and_ordering(o: &Opener) {
    let s = o.open();
    let first = s.inbox_append(Timestamp(1), b"one").await.unwrap();
    let clone = s.clone();
    tokio::task::spawn_blocking(move || clone.reopen())
        .await
        .unwrap()
        .unwrap();
    let second = s.inbox_append(Timestamp(2), b"two").await.unwrap();
    assert!(second > first, "{second} after {first}");
    drop(s);
    let s = o.open();
    let third = s.inbox_append(Timestamp(3), b"three").await.unwrap();
    assert!(third > second, "{third} after {second}");
    let bodies: Vec<_> = (s.inbox_after(0, 10).unwrap().into_iter())
        .map(|(_, r)| r.body)
        .collect();
    assert_eq!(
        bodies,
        vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
    );
    assert_eq!(s.inbox_trim_where(second, |_| true).unwrap(), 2);
    assert_eq!(s.inbox_after(0, 10).unwrap().len(), 1);
}

async fn retention_prunes_only_what_is_older_than_the_cutoff(o: &Opener) {
    let s = o.open();
    let (old, new) = (Timestamp(1_000_000), Timestamp(9_000_000));
    s.transaction(true, |tx| {
        assert!(tx.first_sight("whatsapp", "wamid.old", old)?);
        assert!(tx.first_sight("whatsapp", "wamid.new", new)?);
        Ok(())
    })
    .unwrap();
    s.quarantine(old, b"old body", "unusable").await.unwrap();
    s.quarantine(new, b"new body", "unusable").await.unwrap();

    let cutoff = Timestamp(5_000_000);
    assert_eq!(s.prune_seen(cutoff).unwrap(), 1);
    assert_eq!(s.prune_quarantine(cutoff).unwrap(), 1);
    assert_eq!(s.quarantine_len(), 1);
    s.transaction(true, |tx| {
        // The old id is forgotten (a delivery now would count again), the new one kept.
        assert!(!tx.first_sight("whatsapp", "wamid.new", new)?);
        assert!(tx.first_sight("whatsapp", "wamid.old", new)?);
        Ok(())
    })
    .unwrap();
    assert_eq!(s.prune_seen(cutoff).unwrap(), 0);
}

/// More entries than one of PostgreSQL's pages, read back in order with a limit.
async fn many_inbox_entries_read_back_in_order(o: &Opener) {
    let s = o.open();
    for i in 0..2500 {
        s.inbox_append(Timestamp(i), format!("{{\"n\":{i}}}").as_bytes())
            .await
            .unwrap();
    }
    let all = s.inbox_after(0, 5000).unwrap();
    assert_eq!(all.len(), 2500);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    let some = s.inbox_after(all[1200].0, 1000).unwrap();
    assert_eq!(some.len(), 1000);
    assert_eq!(some[0].0, all[1201].0);
    assert_eq!(some[0].1.body, b"{\"n\":1201}");
}

/// Measures (prints, does not assert) webhook intake: 32 concurrent appenders, each
/// append durable before it returns.
async fn append_rate_with_32_appenders(o: &Opener) {
    let pool = 16;
    let s = match o.pg() {
        Some(_) => o.open_as("rate", pool),
        None => o.open(),
    };
    let started = std::time::Instant::now();
    let per_task = 100;
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let s = s.clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    let body = format!("{{\"t\":{t},\"i\":{i}}}");
                    s.inbox_append(Timestamp::now(), body.as_bytes())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let n = 32 * per_task;
    let secs = started.elapsed().as_secs_f64();
    let engine = match o.pg() {
        Some(_) => format!("postgres (pool of {pool})"),
        None => "sled".to_string(),
    };
    println!(
        "inbox appends on {engine}, 32 appenders: {n} in {secs:.2} s = {:.0}/s",
        n as f64 / secs
    );
    assert_eq!(s.inbox_len(), n);
}
