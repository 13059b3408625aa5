//! Demo load for the dashboard preview (`scripts/dashboard/preview.sh`): starts the fakes of
//! every system on 127.0.0.1 with seeded customers, runs the real daemon binary against them
//! as a child process, and has customers send signed STOP (and a few START) webhooks at a
//! steady pace until the given duration ends, so that a local Prometheus scraping the
//! daemon's `/metrics` records the series the Grafana dashboard plots.
//!
//! Usage: `cargo run --example dashboard-load -- <daemon binary> <listen addr> <seconds>`.

use std::path::Path;
use std::time::{Duration, Instant};

use optout_whatsapp::fake::{WebhookSender, envelope};
use serde_json::json;

const APP_SECRET: &str = "preview-app-secret";
// More than a run of the default length reaches, so that every STOP is a new decision.
const CUSTOMERS: usize = 1000;

fn secret(dir: &Path, name: &str, value: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, value).expect("write secret");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path.display().to_string()
}

fn wa_id(i: usize) -> String {
    format!("1415555{:04}", 1000 + i)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, bin, listen, secs] = &args[..] else {
        eprintln!("usage: dashboard-load <daemon binary> <listen addr> <seconds>");
        std::process::exit(2);
    };
    let secs: u64 = secs.parse().expect("seconds");
    let dir = tempfile::tempdir().expect("temporary directory");

    use optout_hubspot::fake as hs;
    let graph = optout_whatsapp::fake::start_graph(Default::default()).await;
    // The fake's default rate limits stay on, as a real portal's would.
    let hubspot = hs::start(hs::FakeOptions::default()).await;
    let salesforce = optout_salesforce::fake::start(Default::default()).await;
    let hook = optout_webhook::fake::start(Default::default()).await;
    for i in 0..CUSTOMERS {
        let phone = format!("+1 415 555 {:04}", 1000 + i);
        hubspot.create_contact(&[("lastname", &format!("Customer {i}")), ("phone", &phone)]);
        let fields = json!({"LastName": format!("Customer {i}"), "Phone": phone});
        salesforce.insert(if i % 3 == 0 { "Lead" } else { "Contact" }, fields);
    }

    let config = config(dir.path(), listen, &graph, &hubspot, &salesforce, &hook);
    let config_path = dir.path().join("optout-sync.toml");
    std::fs::write(&config_path, config).expect("write config");
    let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log file");
    let mut child = tokio::process::Command::new(bin)
        .args(["run", "--create-state-dir", "--config"])
        .arg(&config_path)
        .env("OPTOUT_SYNC_LOG", "warn")
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the daemon");
    wait_healthy(listen).await;
    eprintln!("daemon up on {listen}; sending webhooks for {secs} s");
    send_load(listen, Duration::from_secs(secs)).await;
    // SIGTERM via the process id we started, so the daemon stops cleanly.
    let pid = child.id().expect("pid").to_string();
    let _ = std::process::Command::new("kill").arg(&pid).status();
    let _ = child.wait().await;
    drop((graph, hubspot, salesforce, hook));
}

/// The daemon's configuration against the fakes (secrets in 0600 files under `d`).
fn config(
    d: &Path,
    listen: &str,
    graph: &optout_whatsapp::fake::FakeGraph,
    hubspot: &optout_hubspot::fake::FakeHandle,
    salesforce: &optout_salesforce::fake::FakeHandle,
    hook: &optout_webhook::fake::FakeHandle,
) -> String {
    format!(
        r#"
[daemon]
state_dir = "{state}"
listen = "{listen}"
control_socket = "{socket}"
gate_token = {{ file = "{gate}" }}
shutdown_timeout = "5s"

[connectors.whatsapp]
kind = "whatsapp"
app_secrets = [{{ file = "{app}" }}]
verify_token = {{ file = "{verify}" }}
access_token = {{ file = "{access}" }}
phone_number_id = "106540352242922"
base_url = "{graph}"

[connectors.hubspot]
kind = "hubspot"
poll_interval = "2s"
base_url = "{hubspot}"
token = {{ file = "{hs_token}" }}

[connectors.salesforce]
kind = "salesforce"
poll_interval = "2s"
login_url = "{salesforce}"
auth = {{ flow = "client_credentials", client_id = "fake-client-id", client_secret = {{ file = "{sf_secret}" }} }}

[connectors.automations]
kind = "webhook"
url = "{hook}"
secret = {{ file = "{hook_secret}" }}
"#,
        state = d.join("state").display(),
        socket = d.join("control.sock").display(),
        gate = secret(d, "gate", "preview-gate-token"),
        app = secret(d, "app-secret", APP_SECRET),
        verify = secret(d, "verify", "preview-verify"),
        access = secret(d, "access", "fake-access-token"),
        graph = graph.base_url(),
        hubspot = hubspot.base_url(),
        hs_token = secret(d, "hs-token", optout_hubspot::fake::TOKEN),
        salesforce = salesforce.base_url(),
        sf_secret = secret(d, "sf-secret", "fake-client-secret"),
        hook = hook.url(),
        hook_secret = secret(d, "hook-secret", "fake-webhook-secret"),
    )
}

async fn wait_healthy(listen: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = format!("http://{listen}/metrics");
    while Instant::now() < deadline {
        if reqwest::get(&url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the daemon did not answer on {url} within 30 s");
}

/// One webhook every ~1.5 s on average, in bursts: mostly STOP from new customers, now and
/// then a START from one who stopped earlier, and a rare badly signed delivery.
async fn send_load(listen: &str, total: Duration) {
    let url = format!("http://{listen}/webhooks/whatsapp");
    let sender = WebhookSender::new(url, APP_SECRET);
    let started = Instant::now();
    let mut n = 0usize;
    while started.elapsed() < total {
        let burst = 1 + (n * 7) % 4;
        for _ in 0..burst {
            let i = n % CUSTOMERS;
            let (who, text) = if n % 9 == 8 {
                (wa_id(i.saturating_sub(5)), "START")
            } else {
                (wa_id(i), "STOP")
            };
            let now_s = optout_core::Timestamp::now().millis() / 1000;
            let body = envelope::text(
                &envelope::Who::wa(&who),
                &format!("wamid.P{n}"),
                now_s,
                text,
            );
            if n % 23 == 22 {
                let _ = sender.deliver_with(&body, Some("sha256=00")).await;
            } else {
                let _ = sender.deliver(&body).await;
            }
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(3000)).await;
    }
    eprintln!("sent {n} webhooks");
}
