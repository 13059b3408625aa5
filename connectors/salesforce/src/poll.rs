//! Reading changes: SOQL on `SystemModstamp` with a compound (SystemModstamp, Id) position
//! per object, paged with `nextRecordsUrl`, all inside one opaque cursor.
//!
//! A *pass* reads every configured object in turn, one page per `poll`, until each query says
//! `done`; `more` stays true until the pass ends. A new pass queries each object from its
//! newest position lowered by `overlap` (`SystemModstamp >= t - overlap`), so rows committed
//! late with an older `SystemModstamp` are still read; re-reads are harmless because the core
//! compares values. (With `overlap = "0s"` a pass resumes exactly after the position.) Within a pass the query locator (`nextRecordsUrl`) continues; when it has
//! expired, the query restarts exactly after the last row read
//! (`SystemModstamp > t OR (SystemModstamp = t AND Id > 'last')`), which stays correct when
//! thousands of rows share one timestamp.

use std::collections::BTreeMap;

use optout_core::{ConnectorError, Cursor, Observation, Page, Progress, Timestamp};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::SalesforceConnector;
use crate::records::Source;
use crate::soql;

const CURSOR_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct CursorState {
    v: u32,
    /// The newest (SystemModstamp, Id) read, per object.
    #[serde(default)]
    positions: BTreeMap<String, Position>,
    /// The pass in progress; `None` between passes.
    #[serde(default)]
    pass: Option<Pass>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Position {
    /// SystemModstamp in milliseconds.
    t: i64,
    id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Pass {
    /// Objects still to read in this pass; the first is being read.
    pending: Vec<String>,
    /// The current object's `nextRecordsUrl`, when its query has more pages.
    #[serde(default)]
    next: Option<String>,
    /// The last row the current object's query returned: where an expired locator resumes.
    /// (Not the newest position: a pass that reaches back by the overlap is still below it.)
    #[serde(default)]
    last: Option<Position>,
    /// A full sync reads every row, ignoring positions.
    #[serde(default)]
    full: bool,
    /// Rows read in this pass so far (progress).
    #[serde(default)]
    read: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueryResponse {
    #[serde(default)]
    done: bool,
    #[serde(default)]
    next_records_url: Option<String>,
    #[serde(default)]
    records: Vec<Value>,
}

/// Where a query starts.
enum Bound<'a> {
    /// Every row.
    Start,
    /// Rows with `SystemModstamp >= t` (a new pass, reaching back by the overlap).
    AtOrAfter(Timestamp),
    /// Rows strictly after (t, id): the exact continuation.
    After(Timestamp, &'a str),
}

/// The SOQL for one object from one starting point, ordered so that (SystemModstamp, Id)
/// is a total order the cursor can resume from.
fn build_query(source: &Source, from: Bound<'_>) -> String {
    let mut conditions = Vec::new();
    conditions.extend(source.filter());
    match from {
        Bound::Start => {}
        Bound::AtOrAfter(t) => {
            conditions.push(format!("SystemModstamp >= {}", soql::datetime_literal(t)))
        }
        Bound::After(t, id) => {
            let t = soql::datetime_literal(t);
            conditions.push(format!(
                "(SystemModstamp > {t} OR (SystemModstamp = {t} AND Id > {}))",
                soql::string_literal(id)
            ));
        }
    }
    let mut q = format!(
        "SELECT {} FROM {}",
        source.fields().join(", "),
        source.name()
    );
    if !conditions.is_empty() {
        q.push_str(" WHERE ");
        q.push_str(&conditions.join(" AND "));
    }
    q.push_str(" ORDER BY SystemModstamp, Id");
    q
}

impl SalesforceConnector {
    pub(crate) async fn poll_page(&self, cursor: Option<&Cursor>) -> Result<Page, ConnectorError> {
        let mut state = self.load_state(cursor)?;
        let mut pass = state.pass.take().unwrap_or_else(|| self.new_pass(false));
        // Objects removed from the configuration since the cursor was saved are skipped.
        pass.pending.retain(|n| self.source(n).is_some());
        let Some(name) = pass.pending.first().cloned() else {
            return Ok(self.page(state, None, Vec::new()));
        };
        let source = self.source(&name).expect("kept above");
        let position = state.positions.get(&name).cloned();
        let resp = self
            .fetch(source, &name, &mut pass, position.as_ref())
            .await?;

        let mut observations = Vec::with_capacity(resp.records.len());
        let mut newest = position;
        for rec in &resp.records {
            let (snap, t, id) = source.snapshot(rec).ok_or_else(|| {
                ConnectorError::Transient(format!(
                    "a {name} row came without Id or a readable SystemModstamp"
                ))
            })?;
            let p = Position { t: t.millis(), id };
            if newest.as_ref().is_none_or(|n| p > *n) {
                newest = Some(p.clone());
            }
            pass.last = Some(p);
            observations.push(Observation::Record(snap));
        }
        if let Some(p) = newest {
            state.positions.insert(name.clone(), p);
        }
        pass.read += observations.len() as u64;
        match resp.next_records_url.filter(|_| !resp.done) {
            Some(url) => pass.next = Some(url),
            None => {
                pass.pending.remove(0);
                pass.last = None;
            }
        }
        let pass = (!pass.pending.is_empty()).then_some(pass);
        Ok(self.page(state, pass, observations))
    }

    /// The saved cursor, or a full pass when there is none. A cursor this version cannot
    /// read is a configuration error rather than a silent restart from scratch.
    fn load_state(&self, cursor: Option<&Cursor>) -> Result<CursorState, ConnectorError> {
        let Some(c) = cursor else {
            return Ok(CursorState {
                v: CURSOR_VERSION,
                positions: BTreeMap::new(),
                pass: Some(self.new_pass(true)),
            });
        };
        serde_json::from_str::<CursorState>(&c.0)
            .ok()
            .filter(|s| s.v == CURSOR_VERSION)
            .ok_or_else(|| {
                ConnectorError::Config(
                    "the saved Salesforce cursor cannot be read; run a full resync".into(),
                )
            })
    }

    /// The next page of the pass's current object: its query locator's next page, or a new
    /// query (see the module doc for where it starts).
    async fn fetch(
        &self,
        source: &Source,
        name: &str,
        pass: &mut Pass,
        position: Option<&Position>,
    ) -> Result<QueryResponse, ConnectorError> {
        let data = match pass.next.take() {
            Some(url) if url.starts_with("/services/data/") => {
                match self
                    .client
                    .call(Method::GET, &url, &[], &self.query_headers(), None)
                    .await
                {
                    Err(e) if e.code.as_deref() == Some("INVALID_QUERY_LOCATOR") => {
                        tracing::info!(connector = %self.name, object = %name,
                            "query locator expired; resuming after the last row read");
                        self.query(source, resume_from(pass.last.as_ref().or(position)))
                            .await?
                    }
                    other => other?,
                }
            }
            // A locator we did not write: continue exactly after the last row.
            Some(_) => {
                self.query(source, resume_from(pass.last.as_ref().or(position)))
                    .await?
            }
            None => {
                let from = match position {
                    Some(p) if !pass.full && self.config.overlap.is_zero() => resume_from(Some(p)),
                    Some(p) if !pass.full => {
                        Bound::AtOrAfter(Timestamp::from_millis(p.t).minus(self.config.overlap))
                    }
                    _ => Bound::Start,
                };
                self.query(source, from).await?
            }
        };
        serde_json::from_value(data)
            .map_err(|e| ConnectorError::Transient(format!("unexpected query response shape: {e}")))
    }

    fn page(
        &self,
        mut state: CursorState,
        pass: Option<Pass>,
        observations: Vec<Observation>,
    ) -> Page {
        let progress = pass.as_ref().map(|p| Progress {
            done: p.read,
            total: None,
        });
        let more = pass.is_some();
        state.pass = pass;
        Page {
            observations,
            cursor: Cursor(serde_json::to_string(&state).expect("cursor serialises")),
            more,
            progress,
        }
    }

    fn new_pass(&self, full: bool) -> Pass {
        Pass {
            pending: self.sources.iter().map(|s| s.name().to_string()).collect(),
            next: None,
            last: None,
            full,
            read: 0,
        }
    }

    fn source(&self, name: &str) -> Option<&Source> {
        self.sources.iter().find(|s| s.name() == name)
    }

    fn query_headers(&self) -> Vec<(&'static str, String)> {
        vec![(
            "Sforce-Query-Options",
            format!("batchSize={}", self.config.page_size),
        )]
    }

    async fn query(&self, source: &Source, from: Bound<'_>) -> Result<Value, ConnectorError> {
        let q = build_query(source, from);
        tracing::debug!(connector = %self.name, soql = %q, "query");
        let path = format!("/services/data/{}/query", self.config.api_version);
        Ok(self
            .client
            .call(
                Method::GET,
                &path,
                &[("q", &q)],
                &self.query_headers(),
                None,
            )
            .await?)
    }
}

fn resume_from(position: Option<&Position>) -> Bound<'_> {
    match position {
        Some(p) => Bound::After(Timestamp::from_millis(p.t), &p.id),
        None => Bound::Start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ObjectConfig;

    #[test]
    fn queries() {
        let t = Timestamp::parse("2026-01-02T10:11:12.345Z").unwrap();
        let c = Source::Object(ObjectConfig::named("Contact"));
        assert_eq!(
            build_query(&c, Bound::Start),
            "SELECT Id, SystemModstamp, MobilePhone, Phone, WhatsApp_Opt_Out__c, WhatsApp_Consent_Changed_At__c FROM Contact ORDER BY SystemModstamp, Id"
        );
        assert!(
            build_query(&c, Bound::AtOrAfter(t))
                .contains(" WHERE SystemModstamp >= 2026-01-02T10:11:12Z ORDER BY")
        );
        assert_eq!(
            build_query(&Source::MessagingEndUser, Bound::After(t, "0PA'x")),
            "SELECT Id, SystemModstamp, MessagingPlatformKey, MessagingConsentStatus FROM MessagingEndUser \
             WHERE MessageType = 'WhatsApp' AND (SystemModstamp > 2026-01-02T10:11:12Z OR \
             (SystemModstamp = 2026-01-02T10:11:12Z AND Id > '0PA\\'x')) ORDER BY SystemModstamp, Id"
        );
    }
}
