//! Shared test helpers: secrets in private temp files, configs, a connector with its
//! in-memory inbox.

use std::path::PathBuf;
use std::sync::Arc;

use optout_core::testkit::write_secret;
use optout_whatsapp::fake::MemoryInbox;
use optout_whatsapp::{Config, WhatsApp};

pub const APP_SECRET: &str = "app-secret-current";
pub const OLD_APP_SECRET: &str = "app-secret-previous";
pub const VERIFY_TOKEN: &str = "verify-me-123";
pub const ACCESS_TOKEN: &str = "fake-access-token";
pub const PHONE_NUMBER_ID: &str = "106540352242922";

/// A directory of secret files (mode 0600), removed on drop.
pub struct Secrets {
    dir: tempfile::TempDir,
}

impl Secrets {
    pub fn new() -> Self {
        Secrets {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Writes (or rewrites) a secret file and returns its path for `{ file = ".." }`.
    pub fn write(&self, name: &str, value: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        write_secret(&p, value);
        p
    }
}

/// A config with the two app secrets, the verify token and the access token in files, plus
/// `extra` TOML appended (top-level keys first, then tables).
pub fn config(secrets: &Secrets, base_url: &str, extra: &str) -> Config {
    let cur = secrets.write("app-secret", APP_SECRET);
    let old = secrets.write("app-secret-old", OLD_APP_SECRET);
    let verify = secrets.write("verify-token", VERIFY_TOKEN);
    let access = secrets.write("access-token", ACCESS_TOKEN);
    let text = format!(
        r#"
        app_secrets = [{{ file = "{}" }}, {{ file = "{}" }}]
        verify_token = {{ file = "{}" }}
        access_token = {{ file = "{}" }}
        phone_number_id = "{PHONE_NUMBER_ID}"
        base_url = "{base_url}"
        timeout = "5s"
        max_sends_per_second = 1000
        {extra}
        "#,
        cur.display(),
        old.display(),
        verify.display(),
        access.display(),
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

pub fn connector(cfg: Config) -> (WhatsApp<MemoryInbox>, Arc<MemoryInbox>) {
    let inbox = MemoryInbox::new();
    let wa = WhatsApp::new("whatsapp", cfg, inbox.clone()).unwrap();
    (wa, inbox)
}
