//! `lookup`: everything known of one person, as JSON (for `--json` and the control
//! socket) and as text for people, with the other forms of their number that the country
//! rules link and why. Read-only: a lookup never creates a subject. Also `numbers
//! --unreadable`: the CRM phone values that could not be read as numbers.

use std::io::Write;

use optout_core::Scope;
use serde_json::{Value, json};

use crate::audit::{AuditEntry, AuditKind};
use crate::identity::Alias;
use crate::policy::Decision;
use crate::reconcile::{Engine, REPLY_WINDOW, subject_name};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("`{0}`: {1}")]
    BadId(String, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub fn lookup(engine: &Engine, id: &str) -> Result<Value, LookupError> {
    let store = engine.store();
    let aliases = engine
        .normalizer()
        .parse_query(id)
        .map_err(|e| LookupError::BadId(id.to_string(), e))?;
    let mut subject = None;
    for a in &aliases {
        if let Some(s) = store.subject_by_alias(a.as_str())? {
            subject = Some(s);
            break;
        }
    }
    let erased = erased(engine, &aliases)?;
    let Some(s) = subject else {
        return Ok(json!({
            "query": id,
            "known": false,
            "erased": erased,
            "variants": variants(engine, &aliases)?,
        }));
    };
    let margin = engine.policy().margin;
    let mut records = Vec::new();
    for (c, r) in &s.links {
        let link = store.link(c, r)?;
        let pending = store.outbox_entry(c, r)?;
        let dead = store.dead_letter(c, r)?;
        let mut record = json!({
            "connector": c,
            "record": r,
            "last_seen": link.as_ref().and_then(|l| l.memory.last_seen),
            "last_pushed": link.as_ref().and_then(|l| l.memory.last_pushed.map(|(st, _)| st)),
            "pushed_at": link.as_ref().and_then(|l| l.pushed_at),
            "awaiting_readback": link.as_ref().is_some_and(|l| l.awaiting_readback),
            "pending": pending.as_ref().map(|p| json!({"status": p.item.status, "attempts": p.attempts, "last_error": p.last_error})),
            "dead_letter": dead.as_ref().map(|d| json!({"status": d.item.status, "reason": d.reason, "at": d.at})),
        });
        if engine.has_marketing_field(c) {
            record["marketing"] = marketing_state(store, c, r, link.as_ref())?;
        }
        records.push(record);
    }
    let decisions: serde_json::Map<_, _> = Scope::EVERY
        .iter()
        .map(|&sc| {
            let reg = s.consent.registers(sc);
            (
                sc.as_str().to_string(),
                json!({
                    "decision": reg.decide(margin),
                    "evidence": reg.deciding(margin),
                    "opt_out": reg.opt_out,
                    "opt_in": reg.opt_in,
                }),
            )
        })
        .collect();
    let history = store.subject_audit(&s)?;
    let possible: Vec<&AuditEntry> = (history.iter())
        .filter(|a| a.kind == AuditKind::PossibleOptOut)
        .collect();
    Ok(json!({
        "query": id,
        "known": true,
        "possible_opt_outs": possible,
        "erased": erased,
        "subject": subject_name(s.id),
        "aliases": s.aliases,
        "variants": variants(engine, &all_aliases(&aliases, &s.aliases))?,
        "decisions": decisions,
        "last_inbound": s.last_inbound,
        "records": records,
        "history": history,
    }))
}

/// Whether the identity was erased: when, and whether it stays suppressed (`null` if not).
fn erased(engine: &Engine, aliases: &[Alias]) -> Result<Value, StoreError> {
    Ok(match engine.tombstone_of(aliases)? {
        Some((hash, t)) => json!({
            "at": t.erased_at,
            "subject": subject_name(t.subject),
            "suppressed": t.suppressed,
            "tombstone": hash,
        }),
        None => Value::Null,
    })
}

/// The erasure of an identity, for people.
fn print_erased(o: &mut impl Write, id: &str, v: &Value) -> std::io::Result<()> {
    let e = &v["erased"];
    if e.is_null() {
        return Ok(());
    }
    let kept = if e["suppressed"] == true {
        "suppressed: opted out of all messages (messages are blocked)"
    } else {
        "not suppressed (was not opted out)"
    };
    writeln!(
        o,
        "{id}: erased on {} (was subject {}); {kept}",
        ts(&e["at"]),
        text(&e["subject"])
    )
}

/// The query's aliases and the subject's, once each.
fn all_aliases(query: &[Alias], subject: &[String]) -> Vec<Alias> {
    let mut out: Vec<Alias> = query.to_vec();
    for a in subject {
        let a = Alias::from_stored(a.clone());
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// The other forms of these aliases' numbers under the country rules: how each is linked,
/// why, and the decision its own subject holds (a suppress-only variant is a subject of
/// its own).
fn variants(engine: &Engine, aliases: &[Alias]) -> Result<Vec<Value>, StoreError> {
    let store = engine.store();
    let margin = engine.policy().margin;
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for a in aliases {
        for v in engine.normalizer().variants(a) {
            if seen.contains(&v.alias) {
                continue;
            }
            seen.push(v.alias.clone());
            let subject = store.subject_by_alias(v.alias.as_str())?;
            out.push(json!({
                "of": a.as_str(),
                "alias": v.alias.as_str(),
                "link": v.link,
                "country": v.rule.country,
                "why": v.rule.why,
                "subject": subject.as_ref().map(|s| subject_name(s.id)),
                "decision": subject.as_ref().map(|s| s.consent.registers(Scope::All).decide(margin)),
            }));
        }
    }
    Ok(out)
}

/// Every record with phone values that are not numbers (all connectors, or one), as
/// `{"records": [{"connector", "record", "field", "raw", "reason", "at"}]}`.
pub fn unreadable(store: &Store, connector: Option<&str>) -> Result<Value, StoreError> {
    let mut rows = Vec::new();
    for r in store.unreadable(connector) {
        let (c, record, numbers) = r?;
        for n in numbers {
            rows.push(json!({
                "connector": c,
                "record": record,
                "field": n.field,
                "raw": n.raw,
                "reason": n.reason,
                "at": n.at,
            }));
        }
    }
    Ok(json!({ "count": rows.len(), "records": rows }))
}

/// Prints unreadable numbers for people: one line each.
pub fn print_unreadable(o: &mut impl Write, v: &Value) -> std::io::Result<()> {
    let rows = v["records"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return writeln!(o, "no unreadable phone numbers");
    }
    writeln!(o, "CONNECTOR\tRECORD\tFIELD\tVALUE\tWHY")?;
    for r in &rows {
        writeln!(
            o,
            "{}\t{}\t{}\t{}\t{}",
            text(&r["connector"]),
            text(&r["record"]),
            text(&r["field"]),
            shorten(&text(&r["raw"]), 64),
            text(&r["reason"]),
        )?;
    }
    Ok(())
}

/// Prints a lookup result for people.
pub fn print(o: &mut impl Write, id: &str, v: &Value) -> std::io::Result<()> {
    print_erased(o, id, v)?;
    if v["known"] != true {
        if v["erased"].is_null() {
            writeln!(
                o,
                "{id}: not known (no observation names this person; messages are allowed)"
            )?;
        }
        return print_variants(o, v);
    }
    print_subject(o, id, v)?;
    print_possible_opt_outs(o, v)?;
    print_variants(o, v)?;
    print_records(o, v)?;
    print_history(o, v)
}

/// The subject, its aliases, its decision per scope and its reply window.
fn print_subject(o: &mut impl Write, id: &str, v: &Value) -> std::io::Result<()> {
    let aliases: Vec<String> = v["aliases"]
        .as_array()
        .map(|a| a.iter().map(text).collect())
        .unwrap_or_default();
    writeln!(
        o,
        "{id}: subject {} ({})",
        text(&v["subject"]),
        aliases.join(", ")
    )?;
    for sc in Scope::EVERY {
        let d = &v["decisions"][sc.as_str()];
        match d["evidence"].as_object() {
            Some(f) => writeln!(
                o,
                "  {:<10} {:<9} since {} — {}:{} {} ({})",
                sc.as_str(),
                text(&d["decision"]),
                ts(&f["at"]),
                text(&f["source"]),
                text(&f["signal"]),
                text(&f["record"]),
                text(&f["evidence"]),
            )?,
            None => writeln!(o, "  {:<10} {}", sc.as_str(), Decision::Unknown.as_str())?,
        }
    }
    if let Some(t) = v["last_inbound"].as_i64() {
        let t = optout_core::Timestamp(t);
        writeln!(
            o,
            "  last WhatsApp message {t}; reply window until {}",
            t.plus(REPLY_WINDOW)
        )?;
    }
    Ok(())
}

/// Messages of this person that may be opt-outs, for an operator to review.
fn print_possible_opt_outs(o: &mut impl Write, v: &Value) -> std::io::Result<()> {
    let possible = v["possible_opt_outs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if possible.is_empty() {
        return Ok(());
    }
    writeln!(
        o,
        "possible opt-outs (not applied; review them, or ask the person): {}",
        possible.len()
    )?;
    for a in &possible {
        writeln!(o, "  {} {}", ts(&a["event_at"]), text(&a["evidence"]))?;
    }
    Ok(())
}

/// The other forms of the number and why they are linked.
fn print_variants(o: &mut impl Write, v: &Value) -> std::io::Result<()> {
    let variants = v["variants"].as_array().cloned().unwrap_or_default();
    if variants.is_empty() {
        return Ok(());
    }
    writeln!(o, "other forms of the number:")?;
    for x in &variants {
        let how = match x["link"].as_str() {
            Some("same") => "same person",
            _ => "suppress-only: an opt-out reaches it, an opt-in does not",
        };
        let held = match x["subject"].as_str() {
            Some(s) => format!("subject {s}, {}", text(&x["decision"])),
            None => "not known".into(),
        };
        writeln!(
            o,
            "  {} ({how}; {}) — {held}",
            text(&x["alias"]),
            text(&x["why"]),
        )?;
    }
    Ok(())
}

/// The linked CRM records and where each one's write stands.
fn print_records(o: &mut impl Write, v: &Value) -> std::io::Result<()> {
    writeln!(o, "linked records:")?;
    let records = v["records"].as_array().cloned().unwrap_or_default();
    if records.is_empty() {
        writeln!(o, "  (none)")?;
    }
    for r in &records {
        writeln!(
            o,
            "  {:<12} {:<28} {}",
            text(&r["connector"]),
            text(&r["record"]),
            record_state(r)
        )?;
        if r["marketing"].is_object() {
            let m = record_state(&r["marketing"]);
            writeln!(o, "  {:<12} {:<28} marketing field: {m}", "", "")?;
        }
    }
    Ok(())
}

/// The state of a record's marketing-consent field, in the shape of a record's own.
fn marketing_state(
    store: &Store,
    connector: &str,
    record: &str,
    link: Option<&crate::store::LinkRecord>,
) -> Result<Value, StoreError> {
    let key = crate::reconcile::marketing_key(record);
    let pending = store.outbox_entry(connector, &key)?;
    let dead = store.dead_letter(connector, &key)?;
    let m = link.map(|l| l.marketing).unwrap_or_default();
    Ok(json!({
        "last_seen": m.memory.last_seen,
        "last_pushed": m.memory.last_pushed.map(|(st, _)| st),
        "pushed_at": m.pushed_at,
        "awaiting_readback": m.awaiting_readback,
        "pending": pending.as_ref().map(|p| json!({"status": p.item.status, "attempts": p.attempts, "last_error": p.last_error})),
        "dead_letter": dead.as_ref().map(|d| json!({"status": d.item.status, "reason": d.reason, "at": d.at})),
    }))
}

/// A linked record's state: rejected, push pending, awaiting read-back, or the value read.
fn record_state(r: &Value) -> String {
    if let Some(d) = r["dead_letter"].as_object() {
        format!("REJECTED: {} ({})", text(&d["reason"]), text(&d["status"]))
    } else if let Some(p) = r["pending"].as_object() {
        let err = p["last_error"]
            .as_str()
            .map(|e| format!(", last error: {e}"))
            .unwrap_or_default();
        format!(
            "push pending: {} (attempts {}{err})",
            text(&p["status"]),
            p["attempts"]
        )
    } else if r["awaiting_readback"] == true {
        format!("pushed {}, not yet read back", text(&r["last_pushed"]))
    } else {
        format!("holds {}", r["last_seen"].as_str().unwrap_or("no value"))
    }
}

/// The subject's audit history, oldest first.
fn print_history(o: &mut impl Write, v: &Value) -> std::io::Result<()> {
    writeln!(o, "history:")?;
    for a in v["history"].as_array().cloned().unwrap_or_default() {
        let opt = |k: &str| a[k].as_str().map(|x| format!("{x} ")).unwrap_or_default();
        writeln!(
            o,
            "  {} {:<17} {:<12} {}{}{}{}",
            ts(&a["stored_at"]),
            text(&a["kind"]),
            text(&a["source"]),
            opt("status"),
            a["scope"]
                .as_str()
                .map(|x| format!("[{x}] "))
                .unwrap_or_default(),
            text(&a["evidence"]),
            a["reason"]
                .as_str()
                .map(|r| format!(" — {r}"))
                .unwrap_or_default(),
        )?;
    }
    Ok(())
}

/// A string field, or nothing when it is missing or not a string.
fn text(v: &Value) -> String {
    v.as_str().unwrap_or("").to_string()
}

fn ts(v: &Value) -> String {
    v.as_i64()
        .map(|t| optout_core::Timestamp(t).to_rfc3339())
        .unwrap_or_default()
}

/// At most `max` characters of `s`, control characters dropped.
pub fn shorten(s: &str, max: usize) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(max).collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_and_unreadable_numbers_print_for_people() {
        let v = json!({
            "known": false,
            "variants": [{
                "of": "w:5491123456789", "alias": "p:+541123456789", "link": "suppress_only",
                "country": "Argentina", "why": "Argentina's international mobile 9",
                "subject": "s7", "decision": "opted_out",
            }],
        });
        let mut out = Vec::new();
        print(&mut out, "wa:5491123456789", &v).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("p:+541123456789 (suppress-only: an opt-out reaches it, an opt-in does not; Argentina's international mobile 9) — subject s7, opted_out"),
            "{text}"
        );
        let rows = json!({"count": 1, "records": [{"connector": "hubspot", "record": "42",
            "field": "phone 1", "raw": "call\u{7} me", "reason": "not a phone number"}]});
        let mut out = Vec::new();
        print_unreadable(&mut out, &rows).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.ends_with("hubspot\t42\tphone 1\tcall me\tnot a phone number\n"),
            "{text:?}"
        );
        let mut out = Vec::new();
        print_unreadable(&mut out, &json!({"count": 0, "records": []})).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "no unreadable phone numbers\n"
        );
    }
}
