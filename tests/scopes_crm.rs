//! The marketing decision in the CRMs, as the real binary against the fakes: HubSpot's
//! `marketing_property` and Salesforce's `objects[].marketing_field` carry the `marketing`
//! decision (an `all` opt-out sets them too) and leave the consent field alone; an agent's
//! edit of one is a `marketing` opt-out at the gate and reaches the other CRM; without the
//! keys nothing changes; `check-config` locates a wrong key and `--connect` names a
//! missing property.

mod common;

use std::path::Path;
use std::time::Duration;

use common::config::Config;
use common::{Daemon, GATE_TOKEN};
use optout_core::Timestamp;
use optout_hubspot::fake::MARKETING_PROPERTY as HS_FIELD;
use optout_salesforce::config::EXAMPLE_MARKETING_FIELD as SF_FIELD;
use optout_sync::control::{self, Request};
use optout_sync::report::GateReply;
use optout_whatsapp::fake::WebhookSender;
use optout_whatsapp::fake::envelope::{self, Who};
use serde_json::{Value, json};

const APP_SECRET: &str = "meta-app-secret-for-crm-scopes";
const WITHIN: Duration = Duration::from_secs(30);

/// Two people: Ada (WhatsApp and both CRMs) and Bo (both CRMs only).
const ADA: &str = "+14155552671";
const ADA_WA: &str = "14155552671";
const BO: &str = "+12125550100";

struct World {
    dir: tempfile::TempDir,
    hs: optout_hubspot::fake::FakeHandle,
    sf: optout_salesforce::fake::FakeHandle,
}

/// One person's records: a HubSpot contact, a Salesforce Contact and Lead.
struct Records {
    hs: String,
    contact: String,
    lead: String,
}

impl World {
    async fn new() -> World {
        let hs = optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
            limits: optout_hubspot::fake::Limits::off(),
            ..Default::default()
        })
        .await;
        // The portal has the property (an operator created it, or an earlier run did).
        hs.add_consent_enumeration(HS_FIELD);
        World {
            dir: tempfile::tempdir().unwrap(),
            hs,
            sf: optout_salesforce::fake::start(Default::default()).await,
        }
    }

    fn seed(&self, phone: &str) -> Records {
        Records {
            hs: self.hs.create_contact(&[("phone", phone)]),
            contact: (self.sf).insert("Contact", json!({"LastName": "C", "Phone": phone})),
            lead: (self.sf).insert(
                "Lead",
                json!({"LastName": "L", "Company": "X", "MobilePhone": phone}),
            ),
        }
    }

    /// WhatsApp, HubSpot and Salesforce (Contact and Lead) against the fakes, without the
    /// marketing keys.
    fn plain(&self) -> Config {
        Config::new(self.dir.path())
            .shutdown_timeout("5s")
            .whatsapp(APP_SECRET)
            .hubspot(&self.hs.base_url())
            .salesforce(&self.sf.base_url())
    }

    /// The same with a marketing field in each CRM.
    fn with_marketing(&self) -> Config {
        self.plain()
            .set("hubspot", &format!("marketing_property = \"{HS_FIELD}\""))
            .set(
                "salesforce",
                &format!(
                    "objects = [{{ name = \"Contact\", marketing_field = \"{SF_FIELD}\" }}, {{ name = \"Lead\", marketing_field = \"{SF_FIELD}\" }}]"
                ),
            )
    }

    async fn start(&self, c: &Config) -> Daemon {
        let d = common::start(self.dir.path(), &c.toml(), &c.env()).await;
        d.until("the first sync of both CRMs", WITHIN, async || {
            d.crms_polled_since(None).await
        })
        .await;
        d
    }

    async fn deliver(&self, d: &Daemon, body: &[u8]) {
        let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET);
        assert!(sender.deliver(body).await.delivered);
    }

    /// (consent, marketing) as each of the person's records holds them.
    fn fields(&self, r: &Records) -> [(Value, Value); 3] {
        let sf = |id: &str| {
            let row = self.sf.get(id).unwrap();
            (row["WhatsApp_Opt_Out__c"].clone(), row[SF_FIELD].clone())
        };
        [
            (
                json!(self.hs.property(&r.hs, "whatsapp_consent")),
                json!(self.hs.property(&r.hs, HS_FIELD)),
            ),
            sf(&r.contact),
            sf(&r.lead),
        ]
    }

    /// Every marketing field opted out, every consent field `consent` (HubSpot's, then
    /// Salesforce's checkbox).
    fn marketing_out(&self, r: &Records, consent: (Value, Value)) -> bool {
        let [hs, c, l] = self.fields(r);
        hs == (consent.0, json!("opted_out"))
            && c == (consent.1.clone(), json!(true))
            && l == (consent.1, json!(true))
    }
}

async fn gate(d: &Daemon, id: &str, category: &str) -> GateReply {
    let mut url = reqwest::Url::parse(&d.url("/v1/consent")).unwrap();
    url.path_segments_mut().unwrap().push(id);
    url.query_pairs_mut().append_pair("category", category);
    let r = (reqwest::Client::new().get(url).bearer_auth(GATE_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Marketing blocked by the `marketing` decision, utility still allowed.
async fn marketing_only_blocked(d: &Daemon, id: &str) -> bool {
    gate(d, id, "marketing").await.blocked_by.as_deref() == Some("marketing")
        && gate(d, id, "utility").await.allowed == Some(true)
}

async fn lookup(d: &Daemon, id: &str) -> Value {
    control::request(&d.socket, &Request::Lookup { id: id.into() }, |_| {})
        .await
        .unwrap()
}

/// Every outbox empty, then two whole CRM polls, then empty again: what was written has
/// been read back and judged.
async fn quiet(d: &Daemon) {
    let empty = async || {
        let s = d.status().await;
        (s.connectors.iter()).all(|c| c.outbox_depth == 0 && c.dead_letters == 0)
    };
    d.until("every outbox empty", WITHIN, empty).await;
    for _ in 0..2 {
        let mark = Timestamp::now();
        d.until("a CRM poll after the mark", WITHIN, async || {
            d.crms_polled_since(Some(mark)).await
        })
        .await;
    }
    d.until("every outbox empty again", WITHIN, empty).await;
}

async fn stop(mut d: Daemon) {
    let status = d.terminate().await;
    assert!(status.success(), "exit {status:?}; log:\n{}", d.log_text());
}

fn now_s() -> i64 {
    Timestamp::now().millis() / 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marketing_stop_sets_the_marketing_fields_and_stop_all_then_the_consent_fields() {
    let w = World::new().await;
    let ada = w.seed("+1 (415) 555-2671");
    let bo = w.seed(BO);
    let d = w.start(&w.with_marketing()).await;

    let stop_marketing = envelope::user_preference(&Who::wa(ADA_WA), "stop", now_s() - 60);
    w.deliver(&d, &stop_marketing).await;
    let unticked = (json!(null), json!(false));
    d.until("every marketing field opted out", WITHIN, async || {
        w.marketing_out(&ada, unticked.clone())
    })
    .await;
    assert!(marketing_only_blocked(&d, ADA).await);
    quiet(&d).await;
    // Read back as written: verified, nothing pending, nothing alarming; the consent
    // fields untouched, the other person untouched.
    assert!(
        w.marketing_out(&ada, unticked.clone()),
        "{:?}",
        w.fields(&ada)
    );
    assert!(
        w.hs.property(&ada.hs, "whatsapp_consent_changed_at")
            .is_none()
    );
    let row = w.sf.get(&ada.contact).unwrap();
    assert!(row.get("WhatsApp_Consent_Changed_At__c").is_none(), "{row}");
    let l = lookup(&d, ADA).await;
    let records = l["records"].as_array().unwrap();
    assert_eq!(records.len(), 3, "{l}");
    for r in records {
        let m = &r["marketing"];
        assert_eq!(
            (&m["last_seen"], &m["awaiting_readback"]),
            (&json!("opted_out"), &json!(false)),
            "{r}"
        );
        assert!(m["pending"].is_null() && m["dead_letter"].is_null(), "{r}");
        assert!(r["last_seen"] != "opted_out", "{r}");
    }
    let status = d.status().await;
    assert!(
        status
            .connectors
            .iter()
            .all(|c| c.unverified_pushes == 0 && c.alarm.is_none()),
        "{status:?}"
    );
    assert_eq!(w.fields(&bo)[0], (json!(null), json!(null)));
    assert_eq!(w.fields(&bo)[1], (json!(false), json!(false)));

    let stop_all = envelope::text(&Who::wa(ADA_WA), "wamid.ALL", now_s() - 30, "STOP ALL");
    w.deliver(&d, &stop_all).await;
    let suppressed = (json!("opted_out"), json!(true));
    d.until("every consent field opted out too", WITHIN, async || {
        w.marketing_out(&ada, suppressed.clone())
    })
    .await;
    for category in ["marketing", "utility", "authentication"] {
        let g = gate(&d, ADA, category).await;
        assert_eq!(
            (g.allowed, g.blocked_by.as_deref()),
            (Some(false), Some("all")),
            "{g:?}"
        );
    }
    quiet(&d).await;
    assert!(w.marketing_out(&ada, suppressed), "{:?}", w.fields(&ada));
    stop(d).await;
}

/// Meta's "Stop promotions" button, under each of its shipped labels, is a marketing
/// opt-out: it reaches both CRMs' marketing fields and leaves their consent fields alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_promotions_button_sets_the_marketing_fields_only() {
    let w = World::new().await;
    let people = [
        ("+14155550101", "Stop promotions"),
        ("+14155550102", "Detener promociones"),
        ("+14155550103", "Parar promoções"),
    ];
    let records: Vec<Records> = people.iter().map(|(p, _)| w.seed(p)).collect();
    let d = w.start(&w.with_marketing()).await;
    for (i, (phone, label)) in people.iter().enumerate() {
        let who = Who::wa(phone.trim_start_matches('+'));
        let id = format!("wamid.SP{i}");
        let body = envelope::button(&who, &id, now_s() - 60, "MKT_OPT_OUT", label);
        w.deliver(&d, &body).await;
    }
    let unticked = (json!(null), json!(false));
    d.until("every marketing field opted out", WITHIN, async || {
        records.iter().all(|r| w.marketing_out(r, unticked.clone()))
    })
    .await;
    for (phone, _) in people {
        assert!(marketing_only_blocked(&d, phone).await, "{phone}");
    }
    quiet(&d).await;
    for r in &records {
        assert!(w.marketing_out(r, unticked.clone()), "{:?}", w.fields(r));
    }
    stop(d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_edit_of_a_marketing_field_reaches_the_gate_and_the_other_crm() {
    let w = World::new().await;
    let ada = w.seed(ADA);
    let bo = w.seed(BO);
    let d = w.start(&w.with_marketing()).await;
    // The first read of an opted-in (unticked) marketing field is no act.
    assert_eq!(gate(&d, BO, "marketing").await.allowed, Some(true));

    // In HubSpot, for Ada: Salesforce's records follow.
    assert!(w.hs.edit_contact(&ada.hs, &[(HS_FIELD, "opted_out")]));
    d.until("Ada's marketing blocked", WITHIN, async || {
        marketing_only_blocked(&d, ADA).await
    })
    .await;
    let g = gate(&d, ADA, "marketing").await;
    let evidence = g.evidence.unwrap_or_default();
    assert_eq!(evidence["source"], "hubspot", "{evidence}");
    assert_eq!(evidence["signal"], "crm_field", "{evidence}");
    let unticked = (json!(null), json!(false));
    d.until("Ada's Salesforce records follow", WITHIN, async || {
        w.marketing_out(&ada, unticked.clone())
    })
    .await;

    // In Salesforce, for Bo: HubSpot follows.
    w.sf.update(&bo.lead, json!({ SF_FIELD: true }));
    d.until("Bo's marketing blocked", WITHIN, async || {
        marketing_only_blocked(&d, BO).await
    })
    .await;
    d.until("Bo's other records follow", WITHIN, async || {
        w.marketing_out(&bo, unticked.clone())
    })
    .await;
    quiet(&d).await;
    for p in [&ada, &bo] {
        assert!(w.marketing_out(p, unticked.clone()), "{:?}", w.fields(p));
    }
    let l = lookup(&d, BO).await;
    assert_eq!(l["decisions"]["marketing"]["decision"], "opted_out", "{l}");
    assert_eq!(l["decisions"]["all"]["decision"], "unknown", "{l}");
    stop(d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_keys_a_marketing_stop_writes_nothing_and_the_fields_are_not_read() {
    let w = World::new().await;
    let ada = w.seed(ADA);
    let d = w.start(&w.plain()).await;
    let (hs_before, sf_before) = (w.hs.counts().batch_update, w.sf.counters().collections);

    w.deliver(
        &d,
        &envelope::user_preference(&Who::wa(ADA_WA), "stop", now_s() - 60),
    )
    .await;
    d.until("marketing blocked", WITHIN, async || {
        marketing_only_blocked(&d, ADA).await
    })
    .await;
    // An agent's edit of the (unconfigured) fields is nobody's business.
    w.hs.edit_contact(&ada.hs, &[(HS_FIELD, "opted_in")]);
    w.sf.update(&ada.contact, json!({ SF_FIELD: true }));
    quiet(&d).await;
    assert_eq!(w.hs.counts().batch_update, hs_before);
    assert_eq!(w.sf.counters().collections, sf_before);
    assert!(marketing_only_blocked(&d, ADA).await);
    let l = lookup(&d, ADA).await;
    assert!(
        (l["records"].as_array().unwrap().iter()).all(|r| r.get("marketing").is_none()),
        "{l}"
    );

    w.deliver(
        &d,
        &envelope::text(&Who::wa(ADA_WA), "wamid.ALL", now_s() - 30, "STOP"),
    )
    .await;
    d.until("the consent fields opted out", WITHIN, async || {
        let [hs, c, l] = w.fields(&ada);
        hs.0 == "opted_out" && c.0 == json!(true) && l.0 == json!(true)
    })
    .await;
    quiet(&d).await;
    let [hs, c, l] = w.fields(&ada);
    assert_eq!(
        (hs.1, c.1, l.1),
        (json!("opted_in"), json!(true), json!(false)),
        "as the agent left them"
    );
    stop(d).await;
}

fn check_config(dir: &Path, c: &Config, connect: bool) -> (Option<i32>, String) {
    let path = dir.join("check.toml");
    std::fs::write(&path, c.toml()).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_optout-sync"));
    cmd.arg("check-config");
    if connect {
        cmd.arg("--connect");
    }
    cmd.arg(&path).env("OPTOUT_GATE_TOKEN", GATE_TOKEN);
    for (k, v) in c.env() {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_locates_wrong_keys_and_the_connect_check_names_a_missing_property() {
    let w = World::new().await;
    let dir = w.dir.path();
    let (code, text) = check_config(dir, &w.with_marketing(), true);
    assert_eq!(code, Some(0), "{text}");

    let wrong = (w.with_marketing())
        .set("hubspot", r#"marketing_property = "mobilephone""#)
        .set(
            "salesforce",
            r#"objects = [{ name = "Contact", marketing_field = "WhatsApp_Opt_Out__c" }]"#,
        );
    let (code, text) = check_config(dir, &wrong, false);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains(
            "connectors.hubspot.marketing_property: must not also be one of phone_properties"
        ),
        "{text}"
    );
    assert!(
        text.contains("connectors.salesforce.objects[0].marketing_field"),
        "{text}"
    );
    let located = text
        .lines()
        .find(|l| l.contains("marketing_property"))
        .unwrap();
    assert!(located.contains("check.toml:"), "{located}");

    w.hs.remove_property(HS_FIELD);
    w.sf.remove_field("Lead", SF_FIELD);
    let (code, text) = check_config(dir, &w.with_marketing(), true);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains(&format!("contact property {HS_FIELD} does not exist")),
        "{text}"
    );
    assert!(
        text.contains(&format!("field {SF_FIELD} does not exist on Lead")),
        "{text}"
    );
}
