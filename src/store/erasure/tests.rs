//! The tombstone hash, the erasure key's life, and audit evidence retention.

use super::*;
use crate::audit::AuditKind;

#[test]
fn the_tombstone_hash_is_hmac_sha256_of_the_normalised_identity() {
    // RFC 4231, test case 2: HMAC pads a short key with zeros, so "Jefe" padded to 32
    // bytes gives the published digest.
    let mut key = [0u8; 32];
    key[..4].copy_from_slice(b"Jefe");
    assert_eq!(
        hex::encode(tombstone_hash(&key, "what do ya want for nothing?")),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    // Each identity and each store's key give their own hash.
    let other = [7u8; 32];
    let a = tombstone_hash(&key, "p:+14155552671");
    assert_ne!(a, tombstone_hash(&key, "w:14155552671"));
    assert_ne!(a, tombstone_hash(&other, "p:+14155552671"));
    assert_eq!(a, tombstone_hash(&key, "p:+14155552671"));
}

#[test]
fn the_key_is_drawn_once_per_store_and_tombstones_are_found_by_identity() {
    let dir = tempfile::tempdir().unwrap();
    let key = {
        let s = crate::store::testing::open(dir.path());
        assert_eq!(s.tombstone("p:+14155552671").unwrap(), None);
        let key = s.erasure_key().unwrap();
        assert_eq!(s.erasure_key().unwrap(), key);
        assert_ne!(key, [0u8; 32]);
        let t = Tombstone {
            erased_at: Timestamp(5),
            subject: 12,
            suppressed: true,
        };
        let hash = s
            .transaction(true, |tx| tx.put_tombstone("p:+14155552671", &t))
            .unwrap();
        assert_eq!(hash, hex::encode(tombstone_hash(&key, "p:+14155552671")));
        key
    };
    let s = crate::store::testing::open(dir.path());
    assert_eq!(s.erasure_key().unwrap(), key, "the key survives a restart");
    let (hash, t) = s.tombstone("p:+14155552671").unwrap().expect("found");
    assert_eq!((t.subject, t.suppressed), (12, true));
    assert_eq!(hash.len(), 64);
    assert_eq!(s.tombstone("p:+14155552672").unwrap(), None);
    // A second store has a key of its own.
    let dir2 = tempfile::tempdir().unwrap();
    assert_ne!(
        crate::store::testing::open(dir2.path())
            .erasure_key()
            .unwrap(),
        key
    );
}

#[test]
fn retention_drops_old_evidence_keeps_decisions_and_reads_only_what_newly_expired() {
    let dir = tempfile::tempdir().unwrap();
    let s = crate::store::testing::open(dir.path());
    for i in 0..10 {
        s.transaction(true, |tx| {
            let mut a = AuditEntry::new(AuditKind::Decision, "whatsapp", Timestamp(i * 1000));
            a.status = Some(optout_core::Status::OptedOut);
            a.evidence = Some(format!("keyword: STOP {i}"));
            tx.audit(&a, &[1])
        })
        .unwrap();
    }
    assert_eq!(s.drop_audit_evidence(Timestamp(4500)).unwrap(), 5);
    let entries: Vec<AuditEntry> = s.audit_from(0).map(Result::unwrap).collect();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.evidence.is_none(), i < 5, "entry {i}: {e:?}");
        assert_eq!(e.status, Some(optout_core::Status::OptedOut));
        assert_eq!(e.kind, AuditKind::Decision);
    }
    // Nothing newly expired: nothing to do; later, the next five.
    assert_eq!(s.drop_audit_evidence(Timestamp(4500)).unwrap(), 0);
    assert_eq!(s.drop_audit_evidence(Timestamp(100_000)).unwrap(), 5);
    assert!(s.audit_from(0).all(|e| e.unwrap().evidence.is_none()));
}
