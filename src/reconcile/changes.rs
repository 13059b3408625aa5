//! Identity changes a channel reports (WhatsApp `system` notices).
//!
//! A new business-scoped user id is the same person under a new name: the old and new ids
//! are linked (merged into one subject). A new phone number is different: the old number
//! may be given to someone else, so the two numbers stay separate subjects. The person's
//! opt-outs are copied to the new number (suppressing a reassigned number is the safe
//! error; an opt-in is never copied), the old number keeps its own, and the person's
//! business-scoped ids move with them to the new number.

use optout_core::{ChangeKind, Identity, IdentityChange, Scope, Status};

use super::{PageTx, identity_text, subject_name};
use crate::identity::Alias;
use crate::policy::{Decision, Fact};
use crate::store::TxResult;

impl PageTx<'_, '_, '_> {
    /// Applies one identity change notice.
    pub(super) fn identity_change(&mut self, c: &IdentityChange) -> TxResult<()> {
        self.report.observations += 1;
        if let Some(id) = &c.message_id
            && !self.tx.first_sight(self.connector, id, self.now)?
        {
            self.tally("duplicate");
            return Ok(());
        }
        let from = self.change_aliases(&c.from, c)?;
        let to = self.change_aliases(&c.to, c)?;
        if from.is_empty() || to.is_empty() {
            return Ok(());
        }
        match c.kind {
            ChangeKind::UserId => {
                self.resolve(&[from, to].concat())?;
                self.tally("identity_linked");
            }
            ChangeKind::Number => self.number_change(&from, &to, c)?,
        }
        Ok(())
    }

    /// The aliases of a change's identities; unreadable ones are rejected in the audit log.
    fn change_aliases(&mut self, ids: &[Identity], c: &IdentityChange) -> TxResult<Vec<Alias>> {
        let mut aliases = Vec::new();
        for identity in ids {
            match self.aliases_of(identity) {
                Ok(a) => aliases.extend(a),
                Err(why) => {
                    self.reject_identity(identity_text(identity), &why, c.message_id.as_deref())?
                }
            }
        }
        Ok(aliases)
    }

    /// The new number becomes (or joins) its own subject, receives the person's opt-outs
    /// as of the change, and takes over the person's business-scoped ids.
    fn number_change(&mut self, from: &[Alias], to: &[Alias], c: &IdentityChange) -> TxResult<()> {
        let mut old = None;
        for a in from.iter().filter(|a| !a.as_str().starts_with("b:")) {
            if let Some(id) = self.live(a.as_str())? {
                old = Some(id);
                break;
            }
        }
        let new = self.resolve(to)?;
        let Some(old) = old.filter(|&o| o != new) else {
            self.tally("number_change_unknown");
            return Ok(());
        };
        self.move_bsuids(old, new)?;
        let margin = self.margin();
        let person = &self.subjects.get(&old).expect("loaded").consent;
        let outs: Vec<Fact> = [Scope::All, Scope::Marketing]
            .into_iter()
            .filter(|&s| person.decide(s, margin) == Decision::OptedOut)
            .filter_map(|s| person.registers(s).opt_out.clone())
            .collect();
        let at = c.at.min(self.now);
        for out in outs {
            let fact = Fact {
                status: Status::OptedOut,
                scope: out.scope,
                at,
                source: self.connector.to_string(),
                record: c.message_id.clone().unwrap_or_default(),
                signal: out.signal,
                evidence: format!(
                    "number change: opt-out of {} carried to the new number",
                    subject_name(old)
                ),
            };
            self.accept(new, &fact, c.at)?;
        }
        self.tally("number_changed");
        Ok(())
    }

    /// Business-scoped ids name the person, not the number: they follow the person to
    /// the new number, so a later message showing the id with the new number does not
    /// merge the old (possibly reassigned) number back in.
    fn move_bsuids(&mut self, old: u64, new: u64) -> TxResult<()> {
        let o = self.subjects.get_mut(&old).expect("loaded");
        let moved: Vec<String> = o
            .aliases
            .iter()
            .filter(|a| a.starts_with("b:"))
            .cloned()
            .collect();
        o.aliases.retain(|a| !a.starts_with("b:"));
        for alias in moved {
            self.tx.put_alias(&alias, new)?;
            let n = self.subjects.get_mut(&new).expect("resolved");
            if !n.aliases.contains(&alias) {
                n.aliases.push(alias);
            }
            self.new_aliases.insert(new);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "changes_tests.rs"]
mod tests;
