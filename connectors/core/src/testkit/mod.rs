//! What every connector's tests share (feature `testkit`): the fake-server start-up
//! ([`FakeServer`]), a poll loop bounded in pages ([`poll_to_end`]), push items and secret
//! files, and the contract every connector is run against over real HTTP ([`contract`]).
//!
//! Test code: failures panic with a message, as a test's own helpers would.

pub mod contract;
mod server;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub use server::FakeServer;

use crate::{
    Connector, Cursor, Observation, PushItem, RecordSnapshot, Scope, SecretRef, Status, Timestamp,
};

/// The most pages [`poll_to_end`] reads before it calls the connector non-terminating.
pub const MAX_PAGES: usize = 1_000;

/// Polls from `cursor` until the source has nothing more right now: (every observation in
/// order, the final cursor, pages read). Panics on an error, and after [`MAX_PAGES`] pages
/// so a connector that never says `more = false` fails the test instead of hanging it.
pub async fn poll_to_end<C: Connector>(
    connector: &C,
    cursor: Option<Cursor>,
) -> (Vec<Observation>, Cursor, usize) {
    let mut cursor = cursor;
    let mut out = Vec::new();
    for pages in 1..=MAX_PAGES {
        let page = match connector.poll(cursor.as_ref()).await {
            Ok(page) => page,
            Err(e) => panic!("poll {pages} failed: {e}"),
        };
        out.extend(page.observations);
        if !page.more {
            return (out, page.cursor, pages);
        }
        cursor = Some(page.cursor);
    }
    panic!("the poll loop did not end within {MAX_PAGES} pages");
}

/// The record snapshots of a CRM's observations; panics on anything else.
pub fn records(observations: Vec<Observation>) -> Vec<RecordSnapshot> {
    observations
        .into_iter()
        .map(|o| match o {
            Observation::Record(r) => r,
            other => panic!("expected a record snapshot, got {other:?}"),
        })
        .collect()
}

/// The key that tells observations apart: a record's id, or an event's message id.
pub fn observation_key(observation: &Observation) -> String {
    match observation {
        Observation::Record(r) => r.record.clone(),
        Observation::Event(e) => match &e.message_id {
            Some(id) => id.clone(),
            None => panic!("an event without a message id cannot be told apart: {e:?}"),
        },
        Observation::IdentityChange(c) => match &c.message_id {
            Some(id) => id.clone(),
            None => panic!("a change without a message id cannot be told apart: {c:?}"),
        },
        Observation::TemplateCategory(t) => {
            format!("template:{}:{}:{}", t.name, t.language, t.at.millis())
        }
    }
}

/// A push item for one record with every other field at a plain default: key
/// `<record>/all`, scope all, source `whatsapp:keyword`, subject `subject-<record>`, no
/// identities and no reply. Adjust fields with struct update syntax.
pub fn push_item(record: &str, status: Status, changed_at: Timestamp) -> PushItem {
    PushItem {
        key: format!("{record}/all"),
        record: record.to_string(),
        status,
        scope: Scope::All,
        changed_at,
        source: "whatsapp:keyword".into(),
        subject: format!("subject-{record}"),
        identities: vec![],
        reply: None,
    }
}

/// Writes `value` to a new file in `dir`, readable by its owner only (as
/// [`SecretRef::File`] demands), and returns the reference to it.
pub fn secret_file(dir: &Path, value: &str) -> SecretRef {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("secret-{}-{n}", std::process::id()));
    write_secret(&path, value);
    SecretRef::File(path)
}

/// Writes (or rewrites) a secret file at `path` with mode 0600.
pub fn write_secret(path: &Path, value: &str) {
    std::fs::write(path, value)
        .unwrap_or_else(|e| panic!("write secret file {}: {e}", path.display()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("chmod 600 {}: {e}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_are_private_and_resolve() {
        let dir = std::env::temp_dir().join(format!("testkit-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = secret_file(&dir, "first");
        let b = secret_file(&dir, "second");
        assert_ne!(a, b, "each call writes its own file");
        assert_eq!(a.resolve().unwrap().expose(), "first");
        assert_eq!(b.resolve().unwrap().expose(), "second");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
