//! Scenarios end to end: the real daemon (a child process) against the fakes of every
//! system it talks to, all on 127.0.0.1 — WhatsApp (signed webhooks in, the Graph API for
//! confirmation replies out), HubSpot, Salesforce (Contact, Lead and WhatsApp
//! MessagingEndUser) and an automation-webhook receiver. Each test configures all four
//! connectors with confirmations on, seeds CRM records, plays one customer story, and
//! checks what every system shows: the fakes' records, the send gate, `status`, `lookup`,
//! the confirmation replies and the automation events.
//!
//! Waits are bounded polls of observable state (never fixed sleeps); "nothing more
//! happens" is checked after every outbox is empty and each CRM has completed a whole
//! poll that started after the fact. Nothing is random: the one injected fault (in the
//! last test, Salesforce cutting every answer for a moment) has rate 1.
//! Each test takes 1–3 s; the file about 9 s of wall time in a debug build on 2 cores.
//!
//! The last two tests guard against regressions of defects these scenarios found: a person
//! who gains identities after their opt-out was announced must be announced again to the
//! automations, and a read-back of the daemon's own write that arrives before the push
//! outcome is recorded is an echo, not a new CRM opt-out.

mod common;

use std::time::Duration;

use common::config::Config;
use common::{Daemon, GATE_TOKEN};
use optout_core::Timestamp;
use optout_sync::control::{self, Request};
use optout_sync::report::GateReply;
use optout_whatsapp::fake::envelope::{self, Who};
use optout_whatsapp::fake::{FakeGraph, GraphOptions, WebhookSender, start_graph};
use serde_json::{Value, json};

const APP_SECRET: &str = "meta-app-secret-for-scenarios";
/// The customer, as an agent typed the number and in canonical form.
const PHONE: &str = "+1 415 555 2671";
const E164: &str = "+14155552671";
/// The customer's WhatsApp id and business-scoped user id.
const WA: &str = "14155552671";
const BSUID: &str = "US.13491208655302741918";
/// Someone else, whose records must never be touched.
const OTHER: &str = "+1 212 555 0100";
const OPTED_OUT_TEXT: &str = "You will get no more messages from us. Reply START to resubscribe.";
const OPTED_IN_TEXT: &str = "You are subscribed again. Reply STOP to unsubscribe.";
const WITHIN: Duration = Duration::from_secs(30);
const CATEGORIES: [&str; 3] = ["utility", "marketing", "authentication"];

// ---------------------------------------------------------------------------------------
// The world: four fakes, the daemon's configuration, and the records of one person.

struct World {
    dir: tempfile::TempDir,
    graph: FakeGraph,
    hs: optout_hubspot::fake::FakeHandle,
    sf: optout_salesforce::fake::FakeHandle,
    hook: optout_webhook::fake::FakeHandle,
}

/// The customer's records: two HubSpot contacts, a Salesforce Contact and Lead (each number
/// in another format) and the WhatsApp MessagingEndUser.
struct Person {
    hs: Vec<String>,
    sf: Vec<String>,
    meu: String,
}

/// Another person's records, in both CRMs.
struct Bystander {
    hs: String,
    sf: String,
}

impl World {
    async fn new() -> World {
        World {
            dir: tempfile::tempdir().unwrap(),
            graph: start_graph(GraphOptions::default()).await,
            hs: optout_hubspot::fake::start(optout_hubspot::fake::FakeOptions {
                limits: optout_hubspot::fake::Limits::off(),
                ..Default::default()
            })
            .await,
            sf: optout_salesforce::fake::start(optout_salesforce::fake::FakeOptions::default())
                .await,
            hook: optout_webhook::fake::start(optout_webhook::fake::FakeOptions::default()).await,
        }
    }

    fn seed_person(&self) -> Person {
        let hs = vec![
            self.hs
                .create_contact(&[("firstname", "Ada"), ("phone", "+1 (415) 555-2671")]),
            self.hs
                .create_contact(&[("firstname", "A."), ("mobilephone", "415.555.2671")]),
        ];
        let sf = vec![
            self.sf.insert(
                "Contact",
                json!({"LastName": "Lovelace", "Phone": "(415) 555-2671"}),
            ),
            self.sf.insert(
                "Lead",
                json!({"LastName": "Lovelace", "Company": "AE", "MobilePhone": "4155552671"}),
            ),
        ];
        let meu = self.sf.insert(
            "MessagingEndUser",
            json!({"Name": "Ada on WhatsApp", "MessageType": "WhatsApp",
                   "MessagingPlatformKey": "whatsapp:+14155552671",
                   "MessagingConsentStatus": "ImplicitlyOptedIn"}),
        );
        Person { hs, sf, meu }
    }

    fn seed_bystander(&self) -> Bystander {
        Bystander {
            hs: self
                .hs
                .create_contact(&[("firstname", "Grace"), ("phone", OTHER)]),
            sf: self.sf.insert(
                "Contact",
                json!({"LastName": "Hopper", "MobilePhone": OTHER}),
            ),
        }
    }

    /// Every connector against its fake, confirmations on with this file's texts, and
    /// the WhatsApp MessagingEndUser synced in Salesforce.
    fn config(&self) -> Config {
        Config::new(self.dir.path())
            .shutdown_timeout("5s")
            .set("policy", r#"opt_in_margin = "5s""#)
            .whatsapp(APP_SECRET)
            .graph(&self.graph.base_url())
            .set("whatsapp", "confirmations.enabled = true")
            .set("whatsapp", r#"confirmations.default_language = "en""#)
            .set(
                "whatsapp",
                &format!(
                    r#"confirmations.texts.en = {{ opted_out = "{OPTED_OUT_TEXT}", opted_in = "{OPTED_IN_TEXT}" }}"#
                ),
            )
            .hubspot(&self.hs.base_url())
            .salesforce(&self.sf.base_url())
            .set("salesforce", "messaging_end_user = true")
            .automations(&self.hook.url())
    }

    /// Starts the daemon and waits for the first complete poll of both CRMs (which links
    /// every record to the people whose numbers it holds).
    async fn start(&self) -> Daemon {
        self.start_with(&self.config()).await
    }

    async fn start_with(&self, config: &Config) -> Daemon {
        let d = common::start(self.dir.path(), &config.toml(), &config.env()).await;
        d.until("the first sync of both CRMs", WITHIN, async || {
            d.crms_polled_since(None).await
        })
        .await;
        d
    }

    /// Posts a body signed like Meta and asserts it was acknowledged.
    async fn deliver(&self, d: &Daemon, body: &[u8]) {
        let sender = WebhookSender::new(d.url("/webhooks/whatsapp"), APP_SECRET);
        let delivery = sender.deliver(body).await;
        assert!(delivery.delivered, "{:?}", delivery.attempts);
    }

    fn hs_prop(&self, id: &str, name: &str) -> Option<String> {
        self.hs.property(id, name)
    }

    fn sf_field(&self, id: &str, field: &str) -> Value {
        self.sf.get(id).expect("known record")[field].clone()
    }

    /// What every record of the person holds, for assertions and failure messages.
    fn values(&self, p: &Person) -> Vec<Value> {
        let mut v: Vec<Value> =
            p.hs.iter()
                .map(|id| json!(self.hs_prop(id, "whatsapp_consent")))
                .collect();
        v.extend(
            p.sf.iter()
                .map(|id| self.sf_field(id, "WhatsApp_Opt_Out__c")),
        );
        v.push(self.sf_field(&p.meu, "MessagingConsentStatus"));
        v
    }

    fn suppressed(&self, p: &Person) -> bool {
        let n = p.hs.len();
        let v = self.values(p);
        v[..n].iter().all(|x| x == "opted_out")
            && v[n..v.len() - 1].iter().all(|x| *x == json!(true))
            && v[v.len() - 1] == "OptedOut"
    }

    fn opted_in(&self, p: &Person) -> bool {
        let n = p.hs.len();
        let v = self.values(p);
        v[..n].iter().all(|x| x == "opted_in")
            && v[n..v.len() - 1].iter().all(|x| *x == json!(false))
            && v[v.len() - 1] == "ExplicitlyOptedIn"
    }

    /// The seeded values: no HubSpot value, unchecked boxes, implicit WhatsApp opt-in.
    fn as_seeded(&self, p: &Person) -> bool {
        let n = p.hs.len();
        let v = self.values(p);
        v[..n].iter().all(Value::is_null)
            && v[n..v.len() - 1].iter().all(|x| *x == json!(false))
            && v[v.len() - 1] == "ImplicitlyOptedIn"
    }

    fn assert_bystander_untouched(&self, b: &Bystander) {
        let c = self.hs.contact(&b.hs).unwrap();
        assert!(
            !c.properties
                .keys()
                .any(|k| k.starts_with("whatsapp_consent")),
            "another person's HubSpot contact was written: {:?}",
            c.properties
        );
        let r = self.sf.get(&b.sf).unwrap();
        assert_eq!(r["WhatsApp_Opt_Out__c"], false, "{r}");
        assert!(r.get("WhatsApp_Consent_Changed_At__c").is_none(), "{r}");
    }

    fn events(&self) -> Vec<optout_webhook::Event> {
        self.hook.events()
    }
}

fn now_s() -> i64 {
    Timestamp::now().millis() / 1000
}

fn ms(t: Option<String>) -> Option<i64> {
    t.as_deref().and_then(Timestamp::parse).map(|t| t.millis())
}

fn sf_ms(v: &Value) -> Option<i64> {
    v.as_str().and_then(Timestamp::parse).map(|t| t.millis())
}

// ---------------------------------------------------------------------------------------
// The daemon's read side.

async fn gate(d: &Daemon, id: &str, category: &str) -> GateReply {
    let mut url = reqwest::Url::parse(&d.url("/v1/consent")).unwrap();
    url.path_segments_mut().unwrap().push(id);
    url.query_pairs_mut().append_pair("category", category);
    let r = reqwest::Client::new()
        .get(url)
        .bearer_auth(GATE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "gate for {id}");
    r.json().await.unwrap()
}

/// Asserts the gate blocks `id` for every category because of an `all` opt-out, and
/// returns the evidence.
async fn assert_blocked_everywhere(d: &Daemon, id: &str) -> Value {
    let mut evidence = Value::Null;
    for c in CATEGORIES {
        let g = gate(d, id, c).await;
        assert_eq!(g.allowed, Some(false), "{id} {c}: {g:?}");
        assert_eq!(g.blocked_by.as_deref(), Some("all"), "{id} {c}: {g:?}");
        evidence = g.evidence.unwrap_or(Value::Null);
    }
    evidence
}

async fn assert_allowed_everywhere(d: &Daemon, id: &str) {
    for c in CATEGORIES {
        let g = gate(d, id, c).await;
        assert_eq!(g.allowed, Some(true), "{id} {c}: {g:?}");
    }
}

async fn lookup(d: &Daemon, id: &str) -> Value {
    control::request(&d.socket, &Request::Lookup { id: id.into() }, |_| {})
        .await
        .unwrap()
}

/// Audit entries of the person's history of one kind.
fn history<'a>(l: &'a Value, kind: &str) -> Vec<&'a Value> {
    l["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|a| a["kind"] == kind)
        .collect()
}

async fn outboxes_empty(d: &Daemon) -> bool {
    let s = d.status().await;
    s.connectors
        .iter()
        .all(|c| c.outbox_depth == 0 && c.dead_letters == 0)
}

/// Waits until nothing is left to do: every outbox empty, then a whole poll of each CRM
/// that started after that (so whatever it read has been judged), then empty again.
async fn quiet(d: &Daemon) {
    d.until("every outbox empty", WITHIN, async || {
        outboxes_empty(d).await
    })
    .await;
    for _ in 0..2 {
        let mark = Timestamp::now();
        d.until("a CRM poll after the mark", WITHIN, async || {
            d.crms_polled_since(Some(mark)).await
        })
        .await;
    }
    d.until("every outbox empty again", WITHIN, async || {
        outboxes_empty(d).await
    })
    .await;
}

/// Waits until every record linked to `id` was read back holding `status`.
async fn read_back(d: &Daemon, id: &str, records: usize, status: &str) {
    d.until(
        &format!("{records} records read back as {status}"),
        WITHIN,
        async || {
            let l = lookup(d, id).await;
            let r = l["records"].as_array().cloned().unwrap_or_default();
            r.len() == records
                && r.iter().all(|r| {
                    r["last_seen"] == status
                        && r["awaiting_readback"] == false
                        && r["pending"].is_null()
                })
        },
    )
    .await;
}

async fn stop(mut d: Daemon) {
    let status = d.terminate().await;
    assert!(status.success(), "exit {status:?}; log:\n{}", d.log_text());
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// The airline case: a customer who gets flight updates replies STOP, then START.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn airline_customer_stops_on_whatsapp_then_starts_again() {
    let w = World::new().await;
    let p = w.seed_person();
    let by = w.seed_bystander();
    let d = w.start().await;
    let t_question = now_s() - 120;
    let t_stop = now_s() - 60;
    let t_start = now_s() - 30;

    // Flight updates may go out; a question about the flight changes nothing.
    assert_allowed_everywhere(&d, PHONE).await;
    w.deliver(
        &d,
        &envelope::text(
            &Who::wa(WA),
            "wamid.Q",
            t_question,
            "Is flight 283 on time?",
        ),
    )
    .await;
    d.until("the question is applied", WITHIN, async || {
        lookup(&d, &format!("wa:{WA}")).await["last_inbound"] == t_question * 1000
    })
    .await;
    assert_allowed_everywhere(&d, PHONE).await;
    let l = lookup(&d, PHONE).await;
    assert_eq!(l["decisions"]["all"]["decision"], "unknown", "{l}");

    // STOP.
    w.deliver(
        &d,
        &envelope::text(&Who::wa(WA), "wamid.STOP", t_stop, "STOP"),
    )
    .await;
    d.until("every record suppressed", WITHIN, async || w.suppressed(&p))
        .await;
    for id in [PHONE, "(415) 555-2671", &format!("wa:{WA}")] {
        let ev = assert_blocked_everywhere(&d, id).await;
        assert_eq!(ev["record"], "wamid.STOP", "{ev}");
        assert_eq!(ev["signal"], "keyword", "{ev}");
        assert_eq!(ev["at"], t_stop * 1000, "{ev}");
    }
    // The CRMs carry the customer's act and its time, not the time we processed it.
    for id in &p.hs {
        assert_eq!(
            ms(w.hs_prop(id, "whatsapp_consent_changed_at")),
            Some(t_stop * 1000)
        );
        assert_eq!(
            w.hs_prop(id, "whatsapp_consent_source").as_deref(),
            Some("whatsapp:keyword")
        );
    }
    for id in &p.sf {
        assert_eq!(
            sf_ms(&w.sf_field(id, "WhatsApp_Consent_Changed_At__c")),
            Some(t_stop * 1000)
        );
    }
    d.until("the confirmation reply", WITHIN, async || {
        !w.graph.sent().is_empty()
    })
    .await;
    d.until("the automation event", WITHIN, async || {
        !w.events().is_empty()
    })
    .await;
    read_back(&d, PHONE, 5, "opted_out").await;
    quiet(&d).await;
    let sent = w.graph.sent();
    assert_eq!(sent.len(), 1, "exactly one confirmation: {sent:?}");
    assert_eq!(sent[0].to.as_deref(), Some(WA));
    assert_eq!(sent[0].text, OPTED_OUT_TEXT);
    assert_eq!(sent[0].context_message_id.as_deref(), Some("wamid.STOP"));
    let events = w.events();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (
            e.kind.as_str(),
            e.scope.as_str(),
            e.status.as_str(),
            e.source.as_str()
        ),
        ("consent.changed", "all", "opted_out", "whatsapp:keyword"),
        "{e:?}"
    );
    assert_eq!(e.identities.phones, [E164]);
    assert_eq!(e.identities.wa_ids, [WA]);
    assert_eq!(
        Timestamp::parse(&e.changed_at).map(|t| t.millis()),
        Some(t_stop * 1000)
    );

    // START, clearly later than the STOP plus the margin.
    w.deliver(
        &d,
        &envelope::text(&Who::wa(WA), "wamid.START", t_start, "START"),
    )
    .await;
    d.until("every record opted in again", WITHIN, async || {
        w.opted_in(&p)
            && p.sf.iter().all(|id| {
                sf_ms(&w.sf_field(id, "WhatsApp_Consent_Changed_At__c")) == Some(t_start * 1000)
            })
    })
    .await;
    for id in &p.hs {
        assert_eq!(
            ms(w.hs_prop(id, "whatsapp_consent_changed_at")),
            Some(t_start * 1000)
        );
    }
    for id in [PHONE, &format!("wa:{WA}")] {
        assert_allowed_everywhere(&d, id).await;
        let g = gate(&d, id, "utility").await;
        let all = g.decisions.as_ref().and_then(|d| d.get("all"));
        assert_eq!(all.map(String::as_str), Some("opted_in"), "{g:?}");
        let record = g.evidence.as_ref().and_then(|e| e["record"].as_str());
        assert_eq!(record, Some("wamid.START"), "{g:?}");
    }
    d.until("the second confirmation", WITHIN, async || {
        w.graph.sent().len() >= 2
    })
    .await;
    d.until("the opted_in event", WITHIN, async || w.events().len() >= 2)
        .await;
    read_back(&d, PHONE, 5, "opted_in").await;
    quiet(&d).await;
    let sent = w.graph.sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[1].text, OPTED_IN_TEXT);
    assert_eq!(sent[1].context_message_id.as_deref(), Some("wamid.START"));
    let events = w.events();
    assert_eq!(events.len(), 2, "{events:?}");
    let e = events
        .iter()
        .find(|e| e.status == "opted_in")
        .expect("an opted_in event");
    assert_eq!(
        (e.scope.as_str(), e.source.as_str()),
        ("all", "whatsapp:keyword")
    );
    let s = d.status().await;
    assert_eq!(s.people("all", "opted_in"), 1, "{s:?}");
    assert_eq!(s.people("all", "opted_out"), 0, "{s:?}");
    w.assert_bystander_untouched(&by);
    stop(d).await;
}

/// An agent records the opt-out on a HubSpot contact: the other contact holding the
/// number, Salesforce, the gate and the automations follow; WhatsApp sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_opt_out_in_hubspot_reaches_salesforce_the_gate_and_automations() {
    let w = World::new().await;
    let p = w.seed_person();
    let by = w.seed_bystander();
    let d = w.start().await;
    assert_allowed_everywhere(&d, PHONE).await;

    let t_agent = Timestamp::now().minus(Duration::from_secs(1));
    w.hs.edit_contact(
        &p.hs[0],
        &[
            ("whatsapp_consent", "opted_out"),
            ("whatsapp_consent_changed_at", &t_agent.to_rfc3339()),
        ],
    );
    d.until("every record suppressed", WITHIN, async || w.suppressed(&p))
        .await;
    for id in &p.sf {
        assert_eq!(
            sf_ms(&w.sf_field(id, "WhatsApp_Consent_Changed_At__c")),
            Some(t_agent.millis())
        );
    }
    assert_eq!(
        w.hs_prop(&p.hs[1], "whatsapp_consent_source").as_deref(),
        Some("hubspot:crm_field")
    );
    for id in [PHONE, "4155552671", &format!("wa:{WA}")] {
        let ev = assert_blocked_everywhere(&d, id).await;
        assert_eq!(
            (&ev["source"], &ev["signal"], &ev["record"]),
            (&json!("hubspot"), &json!("crm_field"), &json!(p.hs[0])),
            "the gate cites the agent's edit, not the daemon's own writes read back: {ev}"
        );
    }
    d.until("the automation event", WITHIN, async || {
        !w.events().is_empty()
    })
    .await;
    quiet(&d).await;
    // The audit names the agent's edit as what decided.
    let l = lookup(&d, PHONE).await;
    let decided = history(&l, "decision");
    assert_eq!(decided.len(), 1, "{decided:?}");
    assert_eq!(decided[0]["status"], "opted_out");
    assert_eq!(decided[0]["event_at"], t_agent.millis());
    let why = decided[0]["evidence"].as_str().unwrap_or("");
    assert!(why.starts_with("hubspot:crm_field"), "{why}");
    let events = w.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (
            events[0].status.as_str(),
            events[0].scope.as_str(),
            events[0].source.as_str()
        ),
        ("opted_out", "all", "hubspot:crm_field")
    );
    assert_eq!(events[0].identities.phones, [E164]);
    assert!(
        w.graph.sent().is_empty(),
        "a CRM opt-out earns no WhatsApp message: {:?}",
        w.graph.sent()
    );
    assert!(w.suppressed(&p), "{:?}", w.values(&p));
    w.assert_bystander_untouched(&by);
    let s = d.status().await;
    assert_eq!(s.people("all", "opted_out"), 1, "{s:?}");
    stop(d).await;
}

/// A CRM opt-in a couple of seconds after a WhatsApp STOP (within the 5 s margin) does not
/// undo it: the records are set back and the audit shows the opt-in observed, not deciding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_opt_in_within_the_margin_of_a_stop_is_set_back() {
    let w = World::new().await;
    let p = w.seed_person();
    let by = w.seed_bystander();
    let d = w.start().await;
    let t_stop = (now_s() - 10) * 1000;

    w.deliver(
        &d,
        &envelope::text(&Who::wa(WA), "wamid.STOP", t_stop / 1000, "Stop"),
    )
    .await;
    d.until("every record suppressed", WITHIN, async || w.suppressed(&p))
        .await;
    read_back(&d, PHONE, 5, "opted_out").await;

    // Agents re-subscribe the customer, stamping times 2 s and 4 s after the STOP.
    let hs_in = Timestamp(t_stop + 2_000);
    let sf_in = Timestamp(t_stop + 4_000);
    w.hs.edit_contact(
        &p.hs[0],
        &[
            ("whatsapp_consent", "opted_in"),
            ("whatsapp_consent_changed_at", &hs_in.to_rfc3339()),
        ],
    );
    w.sf.update(
        &p.sf[0],
        json!({"WhatsApp_Opt_Out__c": false, "WhatsApp_Consent_Changed_At__c": sf_in.to_rfc3339()}),
    );
    let contact = format!("Contact/{}", p.sf[0]);
    d.until("both opt-ins are observed", WITHIN, async || {
        let l = lookup(&d, PHONE).await;
        let ins: Vec<_> = history(&l, "accepted")
            .into_iter()
            .filter(|a| a["status"] == "opted_in")
            .map(|a| (a["record"].clone(), a["event_at"].clone()))
            .collect();
        ins.contains(&(json!(p.hs[0]), json!(hs_in.millis())))
            && ins.contains(&(json!(contact), json!(sf_in.millis())))
    })
    .await;
    d.until("both records set back to opted_out", WITHIN, async || {
        w.suppressed(&p)
    })
    .await;
    // Set back with the STOP's time and origin.
    assert_eq!(
        ms(w.hs_prop(&p.hs[0], "whatsapp_consent_changed_at")),
        Some(t_stop)
    );
    assert_eq!(
        w.hs_prop(&p.hs[0], "whatsapp_consent_source").as_deref(),
        Some("whatsapp:keyword")
    );
    assert_eq!(
        sf_ms(&w.sf_field(&p.sf[0], "WhatsApp_Consent_Changed_At__c")),
        Some(t_stop)
    );

    let l = lookup(&d, PHONE).await;
    let all = &l["decisions"]["all"];
    assert_eq!(all["decision"], "opted_out", "{all}");
    assert_eq!(all["evidence"]["record"], "wamid.STOP", "{all}");
    assert_eq!(
        all["opt_in"]["source"], "salesforce",
        "the latest opt-in is kept: {all}"
    );
    assert_eq!(all["opt_in"]["at"], sf_in.millis(), "{all}");
    let decisions = history(&l, "decision");
    assert!(
        decisions.iter().all(|a| a["status"] == "opted_out"),
        "an opt-in within the margin decided something: {decisions:?}"
    );
    assert_blocked_everywhere(&d, PHONE).await;

    // It stays that way: no opt-in event, no second reply, no tug of war with the CRMs.
    read_back(&d, PHONE, 5, "opted_out").await;
    quiet(&d).await;
    let (hs_pushes, sf_pushes) = (w.hs.counts().batch_update, w.sf.counters().collections);
    quiet(&d).await;
    assert_eq!(
        w.hs.counts().batch_update,
        hs_pushes,
        "HubSpot pushes continue"
    );
    assert_eq!(
        w.sf.counters().collections,
        sf_pushes,
        "Salesforce pushes continue"
    );
    assert!(w.suppressed(&p), "{:?}", w.values(&p));
    let events = w.events();
    assert!(events.iter().all(|e| e.status == "opted_out"), "{events:?}");
    assert_eq!(w.graph.sent().len(), 1, "{:?}", w.graph.sent());
    w.assert_bystander_untouched(&by);
    stop(d).await;
}

/// After a STOP, an import re-sets opt-in on old records carrying old change times: the
/// STOP stands and the records are set back; another person's imported value is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_crm_import_re_setting_opt_in_after_a_stop_is_set_back() {
    let w = World::new().await;
    let p = w.seed_person();
    let by = w.seed_bystander();
    let d = w.start().await;
    let t_stop = now_s() - 5;

    w.deliver(
        &d,
        &envelope::text(&Who::wa(WA), "wamid.STOP", t_stop, "UNSUBSCRIBE"),
    )
    .await;
    d.until("every record suppressed", WITHIN, async || w.suppressed(&p))
        .await;
    read_back(&d, PHONE, 5, "opted_out").await;

    // The import carries last year's consent values and times.
    let old = Timestamp::parse("2024-03-01T09:00:00Z").unwrap();
    for id in p.hs.iter().chain([&by.hs]) {
        assert!(w.hs.edit_contact(
            id,
            &[
                ("whatsapp_consent", "opted_in"),
                ("whatsapp_consent_changed_at", &old.to_rfc3339()),
            ],
        ));
    }
    w.sf.update(
        &p.sf[1],
        json!({"WhatsApp_Opt_Out__c": false, "WhatsApp_Consent_Changed_At__c": old.to_rfc3339()}),
    );
    d.until("the imported opt-ins are observed", WITHIN, async || {
        let l = lookup(&d, PHONE).await;
        history(&l, "accepted")
            .iter()
            .filter(|a| a["status"] == "opted_in" && a["event_at"] == old.millis())
            .count()
            == 3
    })
    .await;
    d.until("the records are set back", WITHIN, async || {
        w.suppressed(&p)
    })
    .await;
    read_back(&d, PHONE, 5, "opted_out").await;
    quiet(&d).await;

    assert!(w.suppressed(&p), "{:?}", w.values(&p));
    for id in &p.hs {
        assert_eq!(
            ms(w.hs_prop(id, "whatsapp_consent_changed_at")),
            Some(t_stop * 1000)
        );
    }
    let ev = assert_blocked_everywhere(&d, PHONE).await;
    assert_eq!(ev["record"], "wamid.STOP", "{ev}");
    let l = lookup(&d, PHONE).await;
    assert_eq!(l["decisions"]["all"]["decision"], "opted_out");
    // The other person's imported value is theirs: the daemon has no reason to change it.
    assert_eq!(
        w.hs_prop(&by.hs, "whatsapp_consent").as_deref(),
        Some("opted_in")
    );
    assert_eq!(
        ms(w.hs_prop(&by.hs, "whatsapp_consent_changed_at")),
        Some(old.millis())
    );
    assert_allowed_everywhere(&d, OTHER).await;
    let events = w.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].status, "opted_out");
    assert_eq!(w.graph.sent().len(), 1);
    stop(d).await;
}

/// Records created after the STOP, holding the number in other formats (one with an
/// opted_in default from a form), are suppressed on first sight in both CRMs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_crm_records_with_an_opted_out_number_are_suppressed_on_first_sight() {
    let w = World::new().await;
    let by = w.seed_bystander();
    let d = w.start().await;
    let t_stop = now_s() - 5;

    w.deliver(
        &d,
        &envelope::text(&Who::wa(WA), "wamid.STOP", t_stop, "STOP"),
    )
    .await;
    d.until("the STOP is applied", WITHIN, async || {
        gate(&d, PHONE, "utility").await.allowed == Some(false)
    })
    .await;
    d.until("the automation event", WITHIN, async || {
        !w.events().is_empty()
    })
    .await;

    let p = Person {
        hs: vec![
            w.hs.create_contact(&[("firstname", "Ada"), ("mobilephone", "(415) 555-2671")]),
            w.hs.create_contact(&[
                ("firstname", "Ada L."),
                ("phone", "001 415 555 2671"),
                ("whatsapp_consent", "opted_in"),
            ]),
        ],
        sf: vec![
            w.sf.insert(
                "Contact",
                json!({"LastName": "Lovelace", "MobilePhone": "+1 415-555-2671"}),
            ),
            w.sf.insert(
                "Lead",
                json!({"LastName": "Lovelace", "Company": "AE", "Phone": "415.555.2671"}),
            ),
        ],
        meu: w.sf.insert(
            "MessagingEndUser",
            json!({"Name": "Ada", "MessageType": "WhatsApp",
                   "MessagingPlatformKey": "whatsapp:+14155552671",
                   "MessagingConsentStatus": "ExplicitlyOptedIn"}),
        ),
    };
    d.until("every new record suppressed", WITHIN, async || {
        w.suppressed(&p)
    })
    .await;
    for id in &p.hs {
        assert_eq!(
            ms(w.hs_prop(id, "whatsapp_consent_changed_at")),
            Some(t_stop * 1000)
        );
        assert_eq!(
            w.hs_prop(id, "whatsapp_consent_source").as_deref(),
            Some("whatsapp:keyword")
        );
    }
    for id in &p.sf {
        assert_eq!(
            sf_ms(&w.sf_field(id, "WhatsApp_Consent_Changed_At__c")),
            Some(t_stop * 1000)
        );
    }
    read_back(&d, PHONE, 5, "opted_out").await;
    quiet(&d).await;
    let l = lookup(&d, PHONE).await;
    assert_eq!(l["decisions"]["all"]["decision"], "opted_out", "{l}");
    // First values read (a form's opted_in default, an ExplicitlyOptedIn messaging user)
    // are not changes, so not acts of the person: audited as ignored, never deciding.
    let ignored: Vec<_> = history(&l, "ignored")
        .iter()
        .map(|a| a["record"].clone())
        .collect();
    assert!(ignored.contains(&json!(p.hs[1])), "{ignored:?}");
    assert!(
        ignored.contains(&json!(format!("MessagingEndUser/{}", p.meu))),
        "{ignored:?}"
    );
    assert!(w.suppressed(&p), "{:?}", w.values(&p));
    assert_eq!(w.events().len(), 1, "{:?}", w.events());
    assert_eq!(w.graph.sent().len(), 1);
    let s = d.status().await;
    assert_eq!(s.people("all", "opted_out"), 1, "{s:?}");
    w.assert_bystander_untouched(&by);
    stop(d).await;
}

/// One person under two phone formats (in both CRMs), a wa_id and a BSUID: a BSUID-only
/// STOP blocks the BSUID; a payload naming both ids makes them one person everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_person_under_two_formats_and_a_bsuid_becomes_one_opted_out_subject() {
    let w = World::new().await;
    let p = w.seed_person();
    let by = w.seed_bystander();
    let d = w.start().await;
    let t_stop = now_s() - 60;

    w.deliver(
        &d,
        &envelope::text(&Who::bsuid(BSUID), "wamid.B1", t_stop, "STOP"),
    )
    .await;
    d.until("the BSUID is blocked", WITHIN, async || {
        gate(&d, BSUID, "utility").await.allowed == Some(false)
    })
    .await;
    d.until("the confirmation to the BSUID", WITHIN, async || {
        !w.graph.sent().is_empty()
    })
    .await;
    quiet(&d).await;
    // Nothing yet says the number is this person's.
    assert_allowed_everywhere(&d, PHONE).await;
    assert!(w.as_seeded(&p), "{:?}", w.values(&p));
    assert_eq!(w.graph.sent()[0].recipient.as_deref(), Some(BSUID));

    // A later message names both: one person.
    w.deliver(
        &d,
        &envelope::text(&Who::both(WA, BSUID), "wamid.B2", now_s() - 30, "ok thanks"),
    )
    .await;
    d.until("every record suppressed", WITHIN, async || w.suppressed(&p))
        .await;
    let mut subjects = Vec::new();
    for id in [
        "+1 (415) 555-2671",
        "415.555.2671",
        "4155552671",
        &format!("wa:{WA}"),
        BSUID,
    ] {
        let ev = assert_blocked_everywhere(&d, id).await;
        assert_eq!(ev["record"], "wamid.B1", "{id}: {ev}");
        subjects.push(lookup(&d, id).await["subject"].clone());
    }
    assert!(
        subjects.iter().all(|s| s.is_string() && *s == subjects[0]),
        "one subject: {subjects:?}"
    );
    read_back(&d, BSUID, 5, "opted_out").await;
    quiet(&d).await;
    let l = lookup(&d, BSUID).await;
    let aliases = l["aliases"].as_array().unwrap();
    for a in [format!("p:{E164}"), format!("w:{WA}"), format!("b:{BSUID}")] {
        assert!(aliases.contains(&json!(a)), "{a} missing from {aliases:?}");
    }
    assert!(!history(&l, "merged").is_empty(), "{l}");
    let s = d.status().await;
    assert_eq!(s.people("all", "opted_out"), 1, "{s:?}");
    assert_eq!(w.graph.sent().len(), 1, "{:?}", w.graph.sent());
    // The automations hear of the person with every identity once they are known.
    let events = w.events();
    assert!(events.iter().all(|e| e.status == "opted_out"), "{events:?}");
    let last = events
        .iter()
        .find(|e| e.subject == l["subject"])
        .expect("an event about the merged person");
    assert_eq!(last.identities.phones, [E164], "{last:?}");
    assert_eq!(last.identities.wa_ids, [WA], "{last:?}");
    assert_eq!(last.identities.bsuids, [BSUID], "{last:?}");
    w.assert_bystander_untouched(&by);
    stop(d).await;
}

/// Meta's marketing stop blocks marketing only and leaves the CRMs alone; "STOP ALL" then
/// blocks everything and suppresses every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketing_stop_then_stop_all() {
    let w = World::new().await;
    let p = w.seed_person();
    let by = w.seed_bystander();
    let d = w.start().await;
    let (hs_before, sf_before) = (w.hs.counts().batch_update, w.sf.counters().collections);

    w.deliver(
        &d,
        &envelope::user_preference(&Who::wa(WA), "stop", now_s() - 60),
    )
    .await;
    d.until("marketing is blocked", WITHIN, async || {
        gate(&d, PHONE, "marketing").await.blocked_by.as_deref() == Some("marketing")
    })
    .await;
    for c in ["utility", "authentication"] {
        let g = gate(&d, PHONE, c).await;
        assert_eq!(g.allowed, Some(true), "{c}: {g:?}");
    }
    d.until("the marketing event", WITHIN, async || {
        !w.events().is_empty()
    })
    .await;
    quiet(&d).await;
    let events = w.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (
            events[0].scope.as_str(),
            events[0].status.as_str(),
            events[0].source.as_str()
        ),
        ("marketing", "opted_out", "whatsapp:marketing_preference")
    );
    // The CRM field is the all-scope consent: nothing was written, nothing attempted.
    assert!(w.as_seeded(&p), "{:?}", w.values(&p));
    assert_eq!(w.hs.counts().batch_update, hs_before);
    assert_eq!(w.sf.counters().collections, sf_before);
    assert!(w.graph.sent().is_empty(), "{:?}", w.graph.sent());

    w.deliver(
        &d,
        &envelope::text(&Who::wa(WA), "wamid.ALL", now_s() - 30, "STOP ALL"),
    )
    .await;
    d.until("every record suppressed", WITHIN, async || w.suppressed(&p))
        .await;
    for id in [PHONE, &format!("wa:{WA}")] {
        let ev = assert_blocked_everywhere(&d, id).await;
        assert_eq!(ev["record"], "wamid.ALL", "{ev}");
    }
    d.until("the confirmation", WITHIN, async || {
        !w.graph.sent().is_empty()
    })
    .await;
    d.until("the all-scope event", WITHIN, async || {
        w.events().len() >= 2
    })
    .await;
    quiet(&d).await;
    let sent = w.graph.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].text, OPTED_OUT_TEXT);
    let events = w.events();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e.scope == "all" && e.status == "opted_out" && e.source == "whatsapp:keyword"),
        "{events:?}"
    );
    let l = lookup(&d, PHONE).await;
    assert_eq!(l["decisions"]["all"]["decision"], "opted_out", "{l}");
    assert_eq!(l["decisions"]["marketing"]["decision"], "opted_out", "{l}");
    w.assert_bystander_untouched(&by);
    stop(d).await;
}

/// The same, in the other order: the BSUID's STOP comes before the CRMs hold the number,
/// so the person who absorbs the CRM records is the one already opted out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bsuid_stop_before_the_crms_know_the_number_still_reaches_their_records() {
    let w = World::new().await;
    let by = w.seed_bystander();
    let d = w.start().await;
    w.deliver(
        &d,
        &envelope::text(&Who::bsuid(BSUID), "wamid.B1", now_s() - 60, "STOP"),
    )
    .await;
    d.until("the BSUID is blocked", WITHIN, async || {
        gate(&d, BSUID, "utility").await.allowed == Some(false)
    })
    .await;
    let p = w.seed_person();
    d.until("the new records are linked", WITHIN, async || {
        lookup(&d, PHONE).await["records"]
            .as_array()
            .is_some_and(|r| r.len() == 5)
    })
    .await;
    quiet(&d).await;
    assert!(w.as_seeded(&p), "{:?}", w.values(&p));
    w.deliver(
        &d,
        &envelope::text(&Who::both(WA, BSUID), "wamid.B2", now_s() - 30, "ok thanks"),
    )
    .await;
    d.until("every record suppressed", WITHIN, async || w.suppressed(&p))
        .await;
    for id in [PHONE, &format!("wa:{WA}"), BSUID] {
        let ev = assert_blocked_everywhere(&d, id).await;
        assert_eq!(ev["record"], "wamid.B1", "{id}: {ev}");
    }
    read_back(&d, PHONE, 5, "opted_out").await;
    quiet(&d).await;
    let s = d.status().await;
    assert_eq!(s.people("all", "opted_out"), 1, "{s:?}");
    assert_eq!(w.graph.sent().len(), 1, "{:?}", w.graph.sent());
    let events = w.events();
    assert!(
        events.iter().any(|e| e.status == "opted_out"
            && e.identities.phones.iter().any(|p| p == E164)
            && e.identities.bsuids.iter().any(|b| b == BSUID)),
        "the automations never heard the number with the BSUID: {events:?}"
    );
    w.assert_bystander_untouched(&by);
    stop(d).await;
}

/// A BSUID-only STOP is announced to the automations with the BSUID alone. When a later
/// payload links the BSUID to a number, the decision does not change, but the automations
/// must still learn that the number and the wa_id are opted out: the decision is announced
/// again under every identity, with a new event id (receivers drop repeated ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automations_learn_the_number_of_a_bsuid_only_stop_once_it_is_linked() {
    let w = World::new().await;
    let d = w.start().await;
    w.deliver(
        &d,
        &envelope::text(&Who::bsuid(BSUID), "wamid.B1", now_s() - 60, "STOP"),
    )
    .await;
    d.until("the BSUID-only event", WITHIN, async || {
        !w.events().is_empty()
    })
    .await;
    w.deliver(
        &d,
        &envelope::text(&Who::both(WA, BSUID), "wamid.B2", now_s() - 30, "ok thanks"),
    )
    .await;
    d.until("the number is blocked", WITHIN, async || {
        gate(&d, PHONE, "utility").await.allowed == Some(false)
    })
    .await;
    quiet(&d).await;
    let events = w.events();
    let linked = events
        .iter()
        .find(|e| e.identities.phones.iter().any(|p| p == E164))
        .unwrap_or_else(|| panic!("the automations were never told of {E164}: {events:?}"));
    assert_eq!(
        (linked.scope.as_str(), linked.status.as_str()),
        ("all", "opted_out"),
        "{linked:?}"
    );
    assert_eq!(linked.identities.wa_ids, [WA], "{linked:?}");
    assert_eq!(linked.identities.bsuids, [BSUID], "{linked:?}");
    assert_eq!(
        events.len(),
        2,
        "one announcement per identity set: {events:?}"
    );
    assert_ne!(events[0].id, events[1].id);
    assert_eq!(events[0].subject, events[1].subject, "{events:?}");
    assert_eq!(events[0].changed_at, events[1].changed_at, "{events:?}");
    assert_eq!(w.graph.sent().len(), 1, "{:?}", w.graph.sent());
    stop(d).await;
}

/// Salesforce applies the daemon's write to the MessagingEndUser but the answer is lost
/// (the connection drops), so the push is retried; the next poll reads the new value
/// before the retry. That value is the daemon's own write, an echo: it must not become a
/// Salesforce opt-out dated at the write (MessagingEndUser has no change-time field),
/// which would then be the deciding opt-out and make a START the customer sent 30 s after
/// the STOP (delivered after the pushes) lose to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_back_before_the_push_outcome_is_recorded_is_an_echo() {
    let w = World::new().await;
    let p = w.seed_person();
    let config = w.config().set("salesforce", r#"poll_interval = "100ms""#);
    let d = w.start_with(&config).await;
    // Right after a Salesforce poll, Salesforce starts doing the work but cutting the
    // connection before answering; as soon as the first collections request is made, it
    // behaves again. The next poll (100 ms) comes before the push is retried (140 ms+).
    let sf_poll = async || -> Option<String> {
        let s = d.status().await;
        s.connector("salesforce")
            .and_then(|c| c.last_poll_ok.clone())
    };
    let before = sf_poll().await;
    let deadline = std::time::Instant::now() + WITHIN;
    while sf_poll().await == before {
        assert!(std::time::Instant::now() < deadline, "no Salesforce poll");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    w.sf.set_faults(optout_salesforce::fake::Faults {
        drop_rate: 1.0,
        ..Default::default()
    });
    let t_stop = now_s() - 60;
    w.deliver(
        &d,
        &envelope::text(&Who::wa(WA), "wamid.STOP", t_stop, "STOP"),
    )
    .await;
    while w.sf.counters().collections == 0 {
        assert!(std::time::Instant::now() < deadline, "no Salesforce push");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    w.sf.set_faults(optout_salesforce::fake::Faults::default());
    d.until("every record suppressed", WITHIN, async || w.suppressed(&p))
        .await;
    read_back(&d, PHONE, 5, "opted_out").await;

    let l = lookup(&d, PHONE).await;
    let from_crm: Vec<_> = history(&l, "accepted")
        .into_iter()
        .filter(|a| a["source"] != "whatsapp")
        .collect();
    assert!(
        from_crm.is_empty(),
        "the daemon's own writes were taken for CRM opt-outs: {from_crm:?}"
    );
    assert_eq!(
        l["decisions"]["all"]["opt_out"]["record"], "wamid.STOP",
        "{l}"
    );

    w.deliver(
        &d,
        &envelope::text(&Who::wa(WA), "wamid.START", t_stop + 30, "START"),
    )
    .await;
    d.until("every record opted in again", WITHIN, async || {
        w.opted_in(&p)
    })
    .await;
    stop(d).await;
}
