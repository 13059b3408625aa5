//! Template categories (WhatsApp's template webhooks, and configured ones): the store keeps
//! each template's newest category, and the send gate decides a `template=` question by it.
//!
//! Newest by event time: a late redelivery of an older notice never replaces a newer one.
//! At the same time, the stricter category stays (marketing over the others), as a tie
//! between an opt-out and an opt-in goes to the opt-out. A configured category is timed
//! [`Timestamp::MIN`]: any announced one replaces it, and a changed configuration replaces
//! the configured one at the next start.
//!
//! An announced change (Meta warns a day before it re-categorises) to marketing gates the
//! template as marketing at once: a day early is the safe error. An announced change away
//! from marketing waits for the notice that it happened.

use optout_core::{TemplateCategory, Timestamp};

use super::PageTx;
use crate::audit::{AuditEntry, AuditKind};
use crate::policy::Category;
use crate::store::{Store, StoreError, TemplateRecord, TxResult};

/// Meta's template categories before 2023, still seen on old templates
/// (`previous_category`), and what they became.
const LEGACY: [(&str, Category); 13] = [
    ("transactional", Category::Utility),
    ("account_update", Category::Utility),
    ("payment_update", Category::Utility),
    ("personal_finance_update", Category::Utility),
    ("shipping_update", Category::Utility),
    ("reservation_update", Category::Utility),
    ("issue_resolution", Category::Utility),
    ("appointment_update", Category::Utility),
    ("transportation_update", Category::Utility),
    ("ticket_update", Category::Utility),
    ("alert_update", Category::Utility),
    ("auto_reply", Category::Utility),
    ("otp", Category::Authentication),
];

/// The category a channel's name stands for. A name this build does not know counts as
/// marketing, the strictest: an unknown category must never let a send past an opt-out.
pub fn category_of(name: &str) -> Category {
    match Category::parse(name) {
        Some(c @ (Category::Marketing | Category::Utility | Category::Authentication)) => c,
        _ => (LEGACY.iter())
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map_or(Category::Marketing, |&(_, c)| c),
    }
}

/// The category a stored template is gated by: its own, or marketing already when a move
/// to marketing is announced.
pub fn gated(t: &TemplateRecord) -> Category {
    match t.upcoming.as_deref().map(category_of) {
        Some(Category::Marketing) => Category::Marketing,
        _ => category_of(&t.category),
    }
}

/// Whether `new` replaces the stored `old`: the newer event wins; at the same time, a
/// configured one replaces a configured one, and otherwise marketing stays.
fn replaces(old: &TemplateRecord, new: &TemplateRecord) -> bool {
    if new.at != old.at {
        return new.at > old.at;
    }
    new.at == Timestamp::MIN
        || gated(new) == Category::Marketing
        || gated(old) != Category::Marketing
}

/// What the gate knows of template `name`: the category it is gated by and the records
/// behind it, or `None` when the store knows no category of it. Announced categories
/// outrank configured ones; across languages the strictest holds.
pub fn lookup(
    store: &Store,
    name: &str,
) -> Result<Option<(Category, Vec<TemplateRecord>)>, StoreError> {
    let all = store.templates_named(name)?;
    Ok(judge(&all).map(|c| (c, all)))
}

/// The category a template name is gated by, from its stored records (one per language,
/// and the configured one): announced ones outrank the configured one, and across
/// languages marketing wins.
fn judge(records: &[TemplateRecord]) -> Option<Category> {
    let announced = records.iter().any(|t| t.at != Timestamp::MIN);
    let counted: Vec<&TemplateRecord> = (records.iter())
        .filter(|t| !announced || t.at != Timestamp::MIN)
        .collect();
    let newest = counted.iter().max_by_key(|t| t.at)?;
    Some(
        match counted.iter().any(|t| gated(t) == Category::Marketing) {
            true => Category::Marketing,
            false => gated(newest),
        },
    )
}

impl PageTx<'_, '_, '_> {
    /// Keeps a template's category if it is newer than the stored one; audits and reports a
    /// change of the category it is gated by.
    pub(super) fn template_category(&mut self, t: &TemplateCategory) -> TxResult<()> {
        self.report.observations += 1;
        if t.name.is_empty() || t.name.len() > 512 || t.language.len() > 64 {
            self.tally("rejected");
            return Ok(());
        }
        let new = TemplateRecord {
            name: t.name.clone(),
            language: t.language.clone(),
            category: t.category.clone(),
            upcoming: t.upcoming.clone(),
            at: t.at,
            id: t.id.clone(),
            source: self.connector.to_string(),
            evidence: super::bounded(&t.evidence, 200),
            stored_at: self.now,
        };
        let mut records = self.tx.templates(&t.name)?;
        let old = records.iter().position(|r| r.language == t.language);
        if let Some(old) = old.map(|i| &records[i]) {
            let same = old.category == new.category && old.upcoming == new.upcoming;
            if (same && old.at == new.at) || !replaces(old, &new) {
                self.tally(if same { "unchanged" } else { "template_stale" });
                return Ok(());
            }
        }
        self.tally("template_category");
        let from = judge(&records);
        match old {
            Some(i) => records[i] = new.clone(),
            None => records.push(new.clone()),
        }
        self.tx.put_templates(&t.name, &records)?;
        let to = judge(&records).unwrap_or(Category::Marketing);
        if from == Some(to) {
            return Ok(());
        }
        if let Some(from) = from {
            (self.report.recategorised).push((from.as_str().into(), to.as_str().into()));
        }
        let mut a = AuditEntry::new(AuditKind::Template, self.connector, self.now);
        a.record = Some(format!("template {} ({})", new.name, new.language));
        a.event_at = (new.at != Timestamp::MIN).then_some(new.at);
        a.evidence = Some(new.evidence.clone());
        a.reason = Some(match from {
            Some(from) => format!("gated as {} → {}", from.as_str(), to.as_str()),
            None => format!("gated as {}", to.as_str()),
        });
        self.tx.audit(&a, &[])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(category: &str, upcoming: Option<&str>, at: i64) -> TemplateRecord {
        TemplateRecord {
            name: "order_update".into(),
            language: "en_US".into(),
            category: category.into(),
            upcoming: upcoming.map(str::to_string),
            at: Timestamp(at),
            id: None,
            source: "whatsapp".into(),
            evidence: String::new(),
            stored_at: Timestamp(0),
        }
    }

    #[test]
    fn categories_by_meta_name_with_unknown_ones_strictest() {
        assert_eq!(category_of("UTILITY"), Category::Utility);
        assert_eq!(category_of("AUTHENTICATION"), Category::Authentication);
        assert_eq!(category_of("marketing"), Category::Marketing);
        assert_eq!(category_of("ACCOUNT_UPDATE"), Category::Utility);
        assert_eq!(category_of("OTP"), Category::Authentication);
        assert_eq!(category_of("SERVICE"), Category::Marketing);
        assert_eq!(category_of("SOMETHING_NEW"), Category::Marketing);
        assert_eq!(
            gated(&rec("UTILITY", Some("MARKETING"), 1)),
            Category::Marketing
        );
        assert_eq!(
            gated(&rec("MARKETING", Some("UTILITY"), 1)),
            Category::Marketing
        );
        assert_eq!(gated(&rec("UTILITY", None, 1)), Category::Utility);
    }

    fn engine(dir: &std::path::Path) -> crate::reconcile::Engine {
        crate::reconcile::Engine::new(
            crate::store::testing::open(dir),
            crate::policy::PolicyConfig::default(),
            crate::identity::Normalizer::new(
                crate::identity::Normalizer::parse_region("US").unwrap(),
            ),
            Default::default(),
        )
    }

    fn notice(language: &str, category: &str, at: Timestamp) -> optout_core::Observation {
        optout_core::Observation::TemplateCategory(TemplateCategory {
            name: "order_update".into(),
            language: language.into(),
            category: category.into(),
            upcoming: None,
            at,
            id: None,
            evidence: format!("test {category}"),
        })
    }

    #[test]
    fn pages_keep_the_newest_notice_count_changes_and_audit_them() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let apply = |obs: &[optout_core::Observation]| {
            e.apply_page("whatsapp", obs, None, Timestamp(5)).unwrap()
        };
        let gated_now = || lookup(e.store(), "order_update").unwrap().map(|(c, _)| c);
        // Configured, then the same configuration at the next start: nothing new.
        apply(&[notice("", "UTILITY", Timestamp::MIN)]);
        let r = apply(&[notice("", "UTILITY", Timestamp::MIN)]);
        assert_eq!(r.results.get("unchanged"), Some(&1));
        assert_eq!(gated_now(), Some(Category::Utility));
        // A newer and an older notice in one page: the newer holds.
        let r = apply(&[
            notice("en_US", "MARKETING", Timestamp(20)),
            notice("en_US", "UTILITY", Timestamp(10)),
        ]);
        assert_eq!(r.results.get("template_stale"), Some(&1));
        assert_eq!(
            r.recategorised,
            [("utility".to_string(), "marketing".to_string())]
        );
        assert_eq!(gated_now(), Some(Category::Marketing));
        // A configuration that says utility no longer counts against an announcement.
        apply(&[notice("", "UTILITY", Timestamp::MIN)]);
        assert_eq!(gated_now(), Some(Category::Marketing));
        // Meta moves it back, later: utility again, counted.
        let r = apply(&[notice("en_US", "UTILITY", Timestamp(30))]);
        assert_eq!(
            r.recategorised,
            [("marketing".to_string(), "utility".to_string())]
        );
        assert_eq!(gated_now(), Some(Category::Utility));
        assert_eq!(lookup(e.store(), "unknown_one").unwrap(), None);
        let audited: Vec<String> = (e.store().audit_from(0))
            .map(|a| a.unwrap())
            .filter(|a| a.kind == AuditKind::Template)
            .map(|a| a.reason.unwrap())
            .collect();
        assert_eq!(
            audited,
            [
                "gated as utility",
                "gated as utility → marketing",
                "gated as marketing → utility"
            ]
        );
    }

    #[test]
    fn the_newest_wins_and_a_tie_keeps_marketing() {
        let (u1, m2) = (rec("UTILITY", None, 1), rec("MARKETING", None, 2));
        assert!(replaces(&u1, &m2));
        assert!(!replaces(&m2, &u1), "an older notice arriving late");
        assert!(replaces(&m2, &rec("UTILITY", None, 3)));
        assert!(
            !replaces(&m2, &rec("UTILITY", None, 2)),
            "a tie keeps marketing"
        );
        assert!(replaces(&rec("UTILITY", None, 2), &m2));
        let seed = |c| rec(c, None, i64::MIN);
        assert!(
            replaces(&seed("MARKETING"), &seed("UTILITY")),
            "configuration changed"
        );
        assert!(replaces(&seed("UTILITY"), &u1));
        assert!(
            !replaces(&u1, &seed("MARKETING")),
            "an announcement outranks configuration"
        );
    }
}
