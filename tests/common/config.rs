//! The daemon's configuration for one test, built from the parts the test needs.
//!
//! Every test that runs the real daemon points its connectors at fakes on 127.0.0.1, and
//! most of that configuration is the same in every file: the `[daemon]` section, and each
//! connector with the fake's credentials and short poll intervals (so a test sees CRM
//! changes within a second). [`Config`] writes those parts once; what is particular to a
//! test is added with [`Config::set`], in the test, where a reader looks for it.
//!
//! Under `OPTOUT_TEST_STORE=postgres` the file also gets a `[store]` table naming a
//! PostgreSQL database of the directory's own (see [`super::store`]); it is written last,
//! so the lines of every other table stay where a test expects them.
//!
//! Secrets never stand in the text: each is an `{ env = "NAME" }` reference, and
//! [`Config::env`] holds the values to start the daemon with. The gate token's variable,
//! `OPTOUT_GATE_TOKEN`, is set by [`super::start`] itself.
//!
//! ```ignore
//! let c = Config::new(dir).whatsapp(APP_SECRET).hubspot(&hs.base_url());
//! let d = common::start(dir, &c.toml(), &c.env()).await;
//! ```

use std::path::Path;

/// A configuration file's tables and the environment its secrets are read from.
#[derive(Clone, Debug)]
pub struct Config {
    /// Tables in the order they are written: the name [`Config::set`] takes, and the lines.
    tables: Vec<(String, Vec<String>)>,
    env: Vec<(&'static str, String)>,
}

impl Config {
    /// `[daemon]`: state and control socket in `dir`, any free port for HTTP. The state
    /// directory is created here, as systemd's `StateDirectory=` does in production (the
    /// daemon refuses a missing one).
    pub fn new(dir: &Path) -> Config {
        // As systemd's StateDirectory= with StateDirectoryMode=0700 provides it.
        let state = dir.join("state");
        std::fs::create_dir_all(&state).expect("create the state directory");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))
            .expect("make the state directory private");
        let config = Config {
            tables: Vec::new(),
            env: Vec::new(),
        }
        .set_all(
            "daemon",
            &[
                &format!("state_dir = \"{}\"", dir.join("state").display()),
                r#"listen = "127.0.0.1:0""#,
                &format!(
                    "control_socket = \"{}\"",
                    dir.join("control.sock").display()
                ),
                r#"gate_token = { env = "OPTOUT_GATE_TOKEN" }"#,
            ],
        );
        // Under OPTOUT_TEST_STORE=postgres: this directory's database.
        (super::store::store_lines(dir).into_iter().flatten())
            .fold(config, |c, line| c.set("store", &line))
    }

    /// How long a stopping daemon waits for work in flight.
    pub fn shutdown_timeout(self, timeout: &str) -> Config {
        self.set("daemon", &format!("shutdown_timeout = \"{timeout}\""))
    }

    /// `[connectors.whatsapp]`: webhooks signed with `app_secret`, and `verify-me` as the
    /// token of Meta's subscription handshake.
    pub fn whatsapp(self, app_secret: &str) -> Config {
        self.set_all(
            "whatsapp",
            &[
                r#"kind = "whatsapp""#,
                r#"app_secrets = [{ env = "WA_APP_SECRET" }]"#,
                r#"verify_token = { env = "WA_VERIFY" }"#,
            ],
        )
        .env_var("WA_APP_SECRET", app_secret)
        .env_var("WA_VERIFY", "verify-me")
    }

    /// The WhatsApp connector's Graph API (for confirmation replies) at `base_url`, with
    /// the Graph fake's default access token. Confirmations stay off unless a test sets
    /// `confirmations.enabled`.
    pub fn graph(self, base_url: &str) -> Config {
        self.set_all(
            "whatsapp",
            &[
                r#"access_token = { env = "WA_TOKEN" }"#,
                r#"phone_number_id = "106540352242922""#,
                &format!("base_url = \"{base_url}\""),
            ],
        )
        .env_var("WA_TOKEN", "fake-access-token")
    }

    /// `[connectors.hubspot]` at `base_url`, with the fake's private-app token.
    pub fn hubspot(self, base_url: &str) -> Config {
        self.crm("hubspot", "base_url", base_url)
            .set("hubspot", r#"token = { env = "HS_TOKEN" }"#)
            .env_var("HS_TOKEN", optout_hubspot::fake::TOKEN)
    }

    /// `[connectors.hubspot]` at `base_url`, authorised by OAuth instead of a token: the
    /// values the HubSpot fake's `FakeOAuth` was started with.
    pub fn hubspot_oauth(
        self,
        base_url: &str,
        client_id: &str,
        client_secret: &str,
        refresh_token: &str,
    ) -> Config {
        self.crm("hubspot", "base_url", base_url)
            .set(
                "hubspot",
                &format!(
                    "oauth = {{ client_id = \"{client_id}\", client_secret = {{ env = \"HS_CLIENT_SECRET\" }}, refresh_token = {{ env = \"HS_REFRESH\" }} }}"
                ),
            )
            .env_var("HS_CLIENT_SECRET", client_secret)
            .env_var("HS_REFRESH", refresh_token)
    }

    /// `[connectors.salesforce]` logging in at `login_url` with the fake's client
    /// credentials.
    pub fn salesforce(self, login_url: &str) -> Config {
        self.crm("salesforce", "login_url", login_url)
            .set(
                "salesforce",
                r#"auth = { flow = "client_credentials", client_id = "fake-client-id", client_secret = { env = "SF_SECRET" } }"#,
            )
            .env_var("SF_SECRET", "fake-client-secret")
    }

    /// `[connectors.automations]`: the automation webhook posting to `url`, signed.
    pub fn automations(self, url: &str) -> Config {
        self.set_all(
            "automations",
            &[
                r#"kind = "webhook""#,
                &format!("url = \"{url}\""),
                r#"secret = { env = "HOOK_SECRET" }"#,
            ],
        )
        .env_var("HOOK_SECRET", "fake-webhook-secret")
    }

    /// Sets one `key = value` line in a table: `daemon`, `policy` and `store` are top-level
    /// tables, any other name is a connector's. A key this builder already wrote is replaced in
    /// place (so a test can change a default), any other is added; a missing table is
    /// created. Sub-tables are written as dotted keys (`confirmations.enabled = true`),
    /// which keeps every line of a table under its one header.
    pub fn set(mut self, table: &str, line: &str) -> Config {
        let key = |l: &str| l.split('=').next().unwrap_or_default().trim().to_string();
        let lines = match self.tables.iter().position(|(name, _)| name == table) {
            Some(i) => &mut self.tables[i].1,
            None => {
                self.tables.push((table.to_string(), Vec::new()));
                &mut self.tables.last_mut().unwrap().1
            }
        };
        match lines.iter().position(|l| key(l) == key(line)) {
            Some(i) => lines[i] = line.to_string(),
            None => lines.push(line.to_string()),
        }
        self
    }

    /// Sets the value of the environment variable a secret reference names.
    pub fn env_var(mut self, name: &'static str, value: &str) -> Config {
        self.env.retain(|(n, _)| *n != name);
        self.env.push((name, value.to_string()));
        self
    }

    /// The configuration file's text.
    pub fn toml(&self) -> String {
        let mut text = String::new();
        // `[store]` last: it is there or not depending on the run, and must not move the
        // other tables' lines.
        let (store, others): (Vec<_>, Vec<_>) =
            self.tables.iter().partition(|(name, _)| name == "store");
        for (name, lines) in others.into_iter().chain(store) {
            let header = match name.as_str() {
                "daemon" | "policy" | "store" => name.clone(),
                _ => format!("connectors.{name}"),
            };
            text += &format!("\n[{header}]\n");
            for line in lines {
                text += line;
                text.push('\n');
            }
        }
        text
    }

    /// The environment to start the daemon with: the value of every secret the text names.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        self.env.clone()
    }

    fn set_all(self, table: &str, lines: &[&str]) -> Config {
        lines.iter().fold(self, |c, line| c.set(table, line))
    }

    /// What both CRM connectors share: polled every 200 ms, so a change in a fake is read
    /// within a fraction of a second, and one second re-read on each poll instead of the
    /// minutes a real CRM's search index or commit lag needs.
    fn crm(self, kind: &str, url_key: &str, url: &str) -> Config {
        self.set_all(
            kind,
            &[
                &format!("kind = \"{kind}\""),
                r#"poll_interval = "200ms""#,
                &format!("{url_key} = \"{url}\""),
                r#"overlap = "1s""#,
            ],
        )
    }
}
