//! Erasure in the store: the store's erasure key, the tombstones keyed by it, the removal
//! of one person's entries inside a transaction, and the audit log's evidence retention.
//!
//! A tombstone is keyed by HMAC-SHA256 of a normalised identity (`p:+14155552671`,
//! `w:14155552671`, `b:US.1349…`) under a 32-byte key drawn once per store from the OS's
//! random source. Without the key a tombstone cannot be tested against a list of numbers;
//! the key lives only in the meta tree (never exported, logged or shown). Tombstones and
//! the key live in the meta tree too (`tomb:` + hash), so they travel with the store and
//! need no tree of their own.

use hmac::{Hmac, Mac};
use optout_core::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{
    ALIASES, AUDIT, AuditEntry, LINKS, META, QUARANTINE, SUBJECT_AUDIT, SUBJECTS, Store,
    StoreError, TxResult, Txn, UNREADABLE, UNVERIFIED, decode, encode, link_key, u64_of,
};

/// The erasure key's entry in the meta tree.
const KEY: &[u8] = b"erasure_key";
const TOMB_PREFIX: &[u8] = b"tomb:";
/// Set by an erasure; the next start compacts the store (see `compact`).
pub(super) const COMPACT_PENDING: &[u8] = b"compact_pending";
/// The audit sequence number up to which evidence retention has run.
const RETENTION_UPTO: &[u8] = b"audit_retention_upto";

/// The store's erasure key.
pub type ErasureKey = [u8; 32];

/// What remains of an erased person under one identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub erased_at: Timestamp,
    /// The erased subject's number (not personal data: it names nobody outside the store).
    pub subject: u64,
    /// The person had opted out (of any scope): whoever later shows this identity is
    /// opted out of all messages, as of the erasure.
    pub suppressed: bool,
}

/// HMAC-SHA256 of a normalised alias under the store's key.
pub fn tombstone_hash(key: &ErasureKey, alias: &str) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(alias.as_bytes());
    mac.finalize().into_bytes().into()
}

fn tomb_key(hash: &[u8; 32]) -> Vec<u8> {
    [TOMB_PREFIX, &hash[..]].concat()
}

fn key_of(bytes: &[u8]) -> Result<ErasureKey, StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("the erasure key has the wrong length".into()))
}

impl Store {
    /// The store's erasure key, drawn from the OS's random source and stored durably the
    /// first time it is needed.
    pub fn erasure_key(&self) -> Result<ErasureKey, StoreError> {
        if let Some(k) = self.with(|db| db.trees[META].get(KEY))? {
            return key_of(&k);
        }
        let mut fresh = [0u8; 32];
        getrandom::getrandom(&mut fresh)
            .map_err(|e| StoreError::Io(format!("the OS's random source failed: {e}")))?;
        self.with(|db| {
            // Another caller may have won the race: its key stands.
            let _ = db.trees[META].compare_and_swap(KEY, None as Option<&[u8]>, Some(&fresh))?;
            db.db.flush()?;
            key_of(&db.trees[META].get(KEY)?.expect("just written"))
        })
    }

    /// The tombstone of a normalised alias, with its hash (hex), if it was erased.
    pub fn tombstone(&self, alias: &str) -> Result<Option<(String, Tombstone)>, StoreError> {
        self.with(|db| {
            let Some(k) = db.trees[META].get(KEY)? else {
                return Ok(None);
            };
            let hash = tombstone_hash(&key_of(&k)?, alias);
            match db.trees[META].get(tomb_key(&hash))? {
                Some(v) => Ok(Some((hex::encode(hash), decode("tombstone", &v)?))),
                None => Ok(None),
            }
        })
    }

    /// Whether an erasure asked for the store's files to be rewritten.
    pub fn compaction_pending(&self) -> Result<bool, StoreError> {
        self.with(|db| Ok(db.trees[META].get(COMPACT_PENDING)?.is_some()))
    }

    /// The audit sequence numbers indexed under these subjects.
    pub fn audit_seqs_of(&self, subjects: &[u64]) -> Result<Vec<u64>, StoreError> {
        self.with(|db| {
            let mut seqs = Vec::new();
            for id in subjects {
                for kv in db.trees[SUBJECT_AUDIT].scan_prefix(id.to_be_bytes()) {
                    seqs.push(u64_of(&kv?.0[8..])?);
                }
            }
            seqs.sort_unstable();
            seqs.dedup();
            Ok(seqs)
        })
    }

    /// Removes quarantined webhook bodies that contain any of `needles` (an erased person's
    /// numbers and ids); returns how many. Bodies waiting in the inbox are left: one may be
    /// an opt-out not yet applied (they are trimmed once applied, within seconds).
    pub fn forget_bodies_with(&self, needles: &[String]) -> Result<usize, StoreError> {
        let needles: Vec<&[u8]> = (needles.iter())
            .filter(|n| n.len() >= 4)
            .map(|n| n.as_bytes())
            .collect();
        let holds = |v: &[u8]| needles.iter().any(|n| v.windows(n.len()).any(|w| w == *n));
        self.with(|db| {
            let mut removed = 0;
            for kv in db.trees[QUARANTINE].iter() {
                let (k, v) = kv?;
                if holds(&v) {
                    db.trees[QUARANTINE].remove(k)?;
                    removed += 1;
                }
            }
            Ok(removed)
        })
    }

    /// Drops the evidence text of audit entries stored before `before`, keeping everything
    /// else (the decisions, their times and sources); returns how many entries lost text.
    /// Entries are visited in sequence order from where the last run stopped, up to the
    /// first entry that is recent enough, so each run reads only what newly expired.
    pub fn drop_audit_evidence(&self, before: Timestamp) -> Result<usize, StoreError> {
        self.with(|db| {
            let meta = &db.trees[META];
            let from = meta.get(RETENTION_UPTO)?.map(|v| u64_of(&v)).transpose()?;
            let mut upto = from.unwrap_or(0);
            let mut dropped = 0;
            for kv in db.trees[AUDIT].range(upto.to_be_bytes()..) {
                let (k, v) = kv?;
                let mut e: AuditEntry = decode("audit", &v)?;
                if e.stored_at >= before {
                    break;
                }
                upto = u64_of(&k)? + 1;
                if e.evidence.take().is_some() {
                    // An entry rewritten meanwhile (an erasure) is left as it now is.
                    let swapped =
                        db.trees[AUDIT].compare_and_swap(&k, Some(&v), Some(&encode(&e)))?;
                    dropped += usize::from(swapped);
                }
            }
            meta.insert(RETENTION_UPTO, upto.to_be_bytes())?;
            Ok(dropped)
        })
    }
}

impl Txn<'_> {
    fn erasure_key(&self) -> TxResult<Option<ErasureKey>> {
        match self.t[META].get(KEY)? {
            Some(k) => Ok(Some(key_of(&k)?)),
            None => Ok(None),
        }
    }

    /// The tombstone of a normalised alias (hash as hex), if it was erased.
    pub fn tombstone(&self, alias: &str) -> TxResult<Option<(String, Tombstone)>> {
        let Some(key) = self.erasure_key()? else {
            return Ok(None);
        };
        let hash = tombstone_hash(&key, alias);
        match self.t[META].get(tomb_key(&hash))? {
            Some(v) => Ok(Some((hex::encode(hash), decode("tombstone", &v)?))),
            None => Ok(None),
        }
    }

    /// Records a tombstone for a normalised alias; returns its hash (hex). The store's key
    /// must exist ([`Store::erasure_key`]).
    pub fn put_tombstone(&self, alias: &str, t: &Tombstone) -> TxResult<String> {
        let key = self
            .erasure_key()?
            .ok_or_else(|| StoreError::Corrupt("the erasure key is missing".into()))?;
        let hash = tombstone_hash(&key, alias);
        self.t[META].insert(tomb_key(&hash), encode(t))?;
        Ok(hex::encode(hash))
    }

    /// Forgets a subject record.
    pub fn remove_subject(&self, id: u64) -> TxResult<()> {
        self.t[SUBJECTS].remove(id.to_be_bytes())?;
        Ok(())
    }

    pub fn remove_alias(&self, alias: &str) -> TxResult<()> {
        self.t[ALIASES].remove(alias.as_bytes())?;
        Ok(())
    }

    /// Forgets a record: its link, unverified push and unreadable numbers.
    pub fn remove_link(&self, connector: &str, record: &str) -> TxResult<()> {
        let k = link_key(connector, record);
        self.t[LINKS].remove(k.clone())?;
        self.t[UNVERIFIED].remove(k.clone())?;
        self.t[UNREADABLE].remove(k)?;
        Ok(())
    }

    /// Removes the evidence text and record id of one audit entry, keeping the rest.
    pub fn scrub_audit(&self, seq: u64) -> TxResult<()> {
        let k = seq.to_be_bytes();
        if let Some(v) = self.t[AUDIT].get(k)? {
            let mut e: AuditEntry = decode("audit", &v)?;
            if e.evidence.is_some() || e.record.is_some() {
                e.evidence = None;
                e.record = None;
                self.t[AUDIT].insert(k, encode(&e))?;
            }
        }
        Ok(())
    }

    /// Asks for the store's files to be rewritten at the next start.
    pub fn request_compaction(&self) -> TxResult<()> {
        self.t[META].insert(COMPACT_PENDING, &[1u8][..])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
