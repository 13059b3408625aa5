//! `resync --full --dry-run` against the real binary and the HubSpot fake: records drift
//! behind the daemon's back; the dry run lists exactly the corrections a real full resync
//! then makes, while pushing nothing, changing no record and moving no cursor.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use common::Daemon;
use common::config::Config;
use optout_core::Timestamp;
use optout_hubspot::fake::{FakeHandle, NewContact};
use optout_sync::report::DryRunReport;

const HOUR: Duration = Duration::from_secs(3600);
/// People whose record drifts to an opt-in older than their opt-out: to be suppressed.
const SUPPRESS: usize = 10;
/// People with two records, one re-opted-in later than the opt-out: the other re-enabled.
const RE_ENABLE: usize = 5;
/// People whose records nobody touches.
const ALONE: usize = 10;

fn phone(i: usize) -> String {
    format!("+1415230{i:04}")
}

fn cli(d: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_optout-sync"))
        .args(args)
        .arg("--config")
        .arg(&d.config)
        .output()
        .unwrap()
}

fn values(hs: &FakeHandle) -> BTreeMap<String, String> {
    (hs.contact_ids().into_iter())
        .map(|id| {
            let v = hs.property(&id, "whatsapp_consent").unwrap_or_default();
            (id, v)
        })
        .collect()
}

async fn settled(d: &Daemon) -> bool {
    let s = d.status().await;
    s.connectors.iter().all(|c| c.outbox_depth == 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_lists_exactly_what_a_full_resync_then_corrects_and_changes_nothing() {
    let hs = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
        limits: optout_hubspot::fake::Limits::off(),
        ..Default::default()
    })
    .await;
    let now = Timestamp::now();
    let out_at = now.minus(HOUR * 2).to_rfc3339();
    let opted_out = |i: usize| {
        NewContact::new()
            .with("phone", &phone(i))
            .with("whatsapp_consent", "opted_out")
            .with("whatsapp_consent_changed_at", &out_at)
    };
    let suppress = hs.create_contacts((0..SUPPRESS).map(opted_out));
    let twins = hs.create_contacts(
        (SUPPRESS..SUPPRESS + RE_ENABLE).flat_map(|i| [opted_out(i), opted_out(i)]),
    );
    let alone = hs.create_contacts((100..100 + ALONE).map(|i| {
        NewContact::new()
            .with("phone", &phone(i))
            .with("whatsapp_consent", "opted_in")
    }));
    let dir = tempfile::tempdir().unwrap();
    // Polled once at start, then only when asked: nothing reads the drift but the resyncs.
    let c = Config::new(dir.path())
        .whatsapp("app-secret")
        .hubspot(&hs.base_url())
        .set("hubspot", r#"poll_interval = "1h""#);
    let mut d = common::start(dir.path(), &c.toml(), &c.env()).await;
    d.until("the first sync", Duration::from_secs(30), async || {
        d.crms_polled_since(None).await
            && d.status().await.people("all", "opted_out") == (SUPPRESS + RE_ENABLE) as i64
    })
    .await;

    // Drift, dated three hours ago (the incremental poll never looks there again).
    hs.freeze_clock(Some(now.minus(HOUR * 3).millis()));
    let early = now.minus(HOUR * 3).to_rfc3339();
    for id in &suppress {
        hs.edit_contact(
            id,
            &[
                ("whatsapp_consent", "opted_in"),
                ("whatsapp_consent_changed_at", &early),
            ],
        );
    }
    let later = now.minus(HOUR).to_rfc3339();
    for pair in twins.chunks(2) {
        hs.edit_contact(
            &pair[0],
            &[
                ("whatsapp_consent", "opted_in"),
                ("whatsapp_consent_changed_at", &later),
            ],
        );
    }
    hs.freeze_clock(None);
    let before = values(&hs);
    let requests = hs.counts();
    let cursor = d
        .status()
        .await
        .connector("hubspot")
        .unwrap()
        .cursor
        .clone();

    let out = cli(
        &d,
        &[
            "resync",
            "--full",
            "--dry-run",
            "--json",
            "--connector",
            "hubspot",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("hubspot: done"), "{progress}");
    let report: DryRunReport = serde_json::from_slice(&out.stdout).unwrap();
    let hubspot = &report.connectors[0];
    let total = (SUPPRESS + 2 * RE_ENABLE + ALONE) as u64;
    assert_eq!(
        (
            hubspot.records,
            hubspot.suppressed,
            hubspot.re_enabled,
            hubspot.left_alone
        ),
        (
            total,
            SUPPRESS as u64,
            RE_ENABLE as u64,
            total - (SUPPRESS + RE_ENABLE) as u64
        ),
        "{hubspot:?}"
    );
    let listed: BTreeSet<(String, String)> = hubspot
        .changes
        .iter()
        .map(|c| (c.record.clone(), c.to.clone()))
        .collect();
    let expected: BTreeSet<(String, String)> = (suppress
        .iter()
        .map(|id| (id.clone(), "opted_out".to_string())))
    .chain(
        twins
            .chunks(2)
            .map(|p| (p[1].clone(), "opted_in".to_string())),
    )
    .collect();
    assert_eq!(listed, expected);
    for ch in &hubspot.changes {
        assert!(
            ch.subject.starts_with('s') && ch.evidence.starts_with("hubspot:crm_field"),
            "{ch:?}"
        );
        let from = if ch.to == "opted_out" {
            "opted_in"
        } else {
            "opted_out"
        };
        assert_eq!(ch.from.as_deref(), Some(from), "{ch:?}");
    }
    assert!(alone.iter().all(|id| !listed.iter().any(|(r, _)| r == id)));
    let out = cli(&d, &["resync", "--full", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("would suppress 10, re-enable 5, leave alone 15")
            && text.contains(&format!("hubspot/{} ", suppress[0]))
            && text.contains("nothing was pushed")
            && text.contains("whatsapp: holds no records; skipped"),
        "{text}"
    );
    // Nothing moved: no write reached HubSpot, no value, no outbox entry, no cursor.
    assert_eq!(hs.counts().batch_update, requests.batch_update);
    assert_eq!(values(&hs), before);
    let s = d.status().await;
    assert_eq!(s.connector("hubspot").unwrap().cursor, cursor);
    assert_eq!(s.connector("hubspot").unwrap().outbox_depth, 0);
    assert_eq!(s.people("all", "opted_in"), 0, "{s:?}");

    // The real run makes exactly those corrections.
    let out = cli(&d, &["resync", "--full", "--connector", "hubspot"]);
    assert!(out.status.success(), "{out:?}");
    d.until(
        "the corrections pushed",
        Duration::from_secs(30),
        async || settled(&d).await && hs.counts().batch_update > requests.batch_update,
    )
    .await;
    let after = values(&hs);
    let corrected: BTreeSet<(String, String)> = (after.iter())
        .filter(|(id, v)| before.get(*id) != Some(*v))
        .map(|(id, v)| (id.clone(), v.clone()))
        .collect();
    assert_eq!(corrected, listed);
    assert!(d.terminate().await.success(), "{}", d.log_text());
}
