//! Reading contacts through CRM search, one search request per `poll`.
//!
//! Every page is a fresh query that starts where the previous page ended (keyset paging);
//! the connector never pages with `after`. That avoids three traps of offset paging:
//! HubSpot refuses offsets past 10,000 results; a record modified while we page moves to
//! the end of the sort order and shifts unread records below our offset (they would be
//! skipped); and a cursor holding an offset is meaningless once the result set changed.
//!
//! A pass reads, in `lastmodifieddate` order, every contact modified at or after `from`:
//! - **Range** pages ask for `lastmodifieddate >= from` sorted ascending. A full page holds
//!   every record below its highest timestamp `M`, but only some of those *at* `M` (HubSpot
//!   orders ties arbitrarily), so the next page starts at `>= M` and drops the ids already
//!   reported at `M`: nothing is skipped and nothing reported twice.
//! - When a whole full page shares one timestamp `T` (thousands of contacts imported in the
//!   same millisecond), `>= T` cannot move on. The pass switches to a **tie** run:
//!   `lastmodifieddate == T AND hs_object_id > last id` sorted by id, until a short page,
//!   then continues with `lastmodifieddate > T`.
//! - A short range page ends the pass. The next pass starts at the server time of this
//!   pass's first request minus `overlap`: a write becomes searchable only after a delay,
//!   so a contact written just before the pass may still be missing from its results.
//!   Contacts in the overlap are read again; the core ignores unchanged values.
//!
//! The connector reports what it reads. Deciding, change detection and recognising the
//! echo of our own writes belong to the core.

use optout_core::{
    ConnectorError, Cursor, Observation, Page, Progress, RecordSnapshot, Status, Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::HubSpot;
use crate::limit::Kind;

const SEARCH_PATH: &str = "/crm/v3/objects/contacts/search";
/// The `Date` header has second resolution: step back one more second so a pass never
/// starts after a write it has not seen.
const DATE_RESOLUTION_MS: i64 = 1_000;

/// The cursor, serialised as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct State {
    /// Format version of this cursor.
    v: u8,
    at: Position,
    pass: Pass,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Position {
    /// Contacts with `lastmodifieddate >= from` (`> from` when `exclusive`); `seen` were
    /// already reported with `lastmodifieddate == from` in this pass.
    Range {
        from: i64,
        #[serde(default)]
        exclusive: bool,
        #[serde(default)]
        seen: Vec<u64>,
    },
    /// Contacts with `lastmodifieddate == at` and an id above `after_id`, in id order;
    /// `seen` were reported at `at` by range pages before the run started.
    Tie {
        at: i64,
        after_id: u64,
        #[serde(default)]
        seen: Vec<u64>,
    },
}

/// What a pass (a full sync, or one incremental catch-up) remembers across pages.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Pass {
    /// Server time of the pass's first request; the next pass starts `overlap` before it.
    started: Option<i64>,
    /// Highest `lastmodifieddate` read, the fallback start when there was no `Date`.
    high: i64,
    /// Contacts reported in this pass, and the estimate of the pass's size.
    done: u64,
    total: Option<u64>,
}

impl State {
    fn full_sync() -> State {
        State::starting_at(0, Pass::default())
    }

    fn starting_at(from: i64, pass: Pass) -> State {
        State {
            v: 1,
            at: Position::Range {
                from,
                exclusive: false,
                seen: Vec::new(),
            },
            pass,
        }
    }

    fn decode(c: &Cursor) -> Result<State, ConnectorError> {
        serde_json::from_str::<State>(&c.0)
            .ok()
            .filter(|s| s.v == 1)
            .ok_or_else(|| {
                ConnectorError::Config(format!(
                    "unreadable HubSpot cursor {:?}; run a full resync",
                    c.0
                ))
            })
    }

    fn encode(&self) -> Cursor {
        Cursor(serde_json::to_string(self).expect("the cursor serialises"))
    }
}

#[derive(Deserialize)]
struct SearchResponse {
    #[serde(default)]
    total: Option<u64>,
    #[serde(default)]
    results: Vec<Contact>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Contact {
    id: String,
    #[serde(default)]
    properties: std::collections::HashMap<String, Option<String>>,
    updated_at: Option<String>,
}

/// A contact with the two values the cursor works with.
struct Read {
    id: u64,
    modified: i64,
    contact: Contact,
}

impl HubSpot {
    pub(crate) async fn poll_page(&self, cursor: Option<&Cursor>) -> Result<Page, ConnectorError> {
        let mut st = match cursor {
            None => State::full_sync(),
            Some(c) => State::decode(c)?,
        };
        let body = self.search_body(&st.at);
        let resp = self
            .client
            .post(Kind::Search, SEARCH_PATH, &body)
            .await?
            .success()?;
        let parsed: SearchResponse = resp.json()?;
        let page_size = self.config.page_size;
        let full = parsed.results.len() >= page_size;
        let reads = parsed
            .results
            .into_iter()
            .map(read)
            .collect::<Result<Vec<_>, _>>()?;

        let done_before = st.pass.done;
        st.pass.started = st.pass.started.or(resp.date.map(Timestamp::millis));
        if let Some(h) = reads.iter().map(|r| r.modified).max() {
            st.pass.high = st.pass.high.max(h);
        }

        // Drop what this pass reported already (the ids at the boundary timestamp).
        let fresh: Vec<&Read> = reads
            .iter()
            .filter(|r| match &st.at {
                Position::Range {
                    from,
                    exclusive: false,
                    seen,
                } => !(r.modified == *from && seen.contains(&r.id)),
                Position::Range {
                    exclusive: true, ..
                } => true,
                Position::Tie { seen, .. } => !seen.contains(&r.id),
            })
            .collect();
        let observations: Vec<Observation> = fresh
            .iter()
            .map(|r| Observation::Record(self.snapshot(r)))
            .collect();
        st.pass.done += observations.len() as u64;

        let mut more = true;
        st.at = match std::mem::replace(
            &mut st.at,
            Position::Range {
                from: 0,
                exclusive: false,
                seen: vec![],
            },
        ) {
            Position::Range {
                from,
                exclusive,
                seen,
            } => {
                st.pass.total = parsed.total.map(|t| done_before + t);
                if !full {
                    more = false;
                    Position::Range {
                        from,
                        exclusive,
                        seen,
                    }
                } else {
                    let low = reads.iter().map(|r| r.modified).min().unwrap_or(from);
                    let high = reads.iter().map(|r| r.modified).max().unwrap_or(from);
                    let at_high: Vec<u64> = reads
                        .iter()
                        .filter(|r| r.modified == high)
                        .map(|r| r.id)
                        .collect();
                    if low == high {
                        // The whole page shares one timestamp: walk it by id.
                        let mut seen_at_high = at_high;
                        if high == from && !exclusive {
                            seen_at_high.extend(seen);
                        }
                        Position::Tie {
                            at: high,
                            after_id: 0,
                            seen: seen_at_high,
                        }
                    } else {
                        Position::Range {
                            from: high,
                            exclusive: false,
                            seen: at_high,
                        }
                    }
                }
            }
            Position::Tie {
                at,
                after_id,
                mut seen,
            } => {
                if full {
                    let last = reads.iter().map(|r| r.id).max().unwrap_or(after_id);
                    // Ids up to `last` are excluded by the query from now on.
                    seen.retain(|id| *id > last);
                    Position::Tie {
                        at,
                        after_id: last,
                        seen,
                    }
                } else {
                    Position::Range {
                        from: at,
                        exclusive: true,
                        seen: Vec::new(),
                    }
                }
            }
        };

        let progress = Some(Progress {
            done: st.pass.done,
            total: st.pass.total,
        });
        if !more {
            // Caught up: the next pass re-reads the overlap window (see the module doc).
            let overlap = self.config.overlap.as_millis() as i64;
            let next = match st.pass.started {
                Some(started) => started - overlap - DATE_RESOLUTION_MS,
                None => st.pass.high - overlap,
            };
            let next = next.max(0);
            tracing::debug!(
                done = st.pass.done,
                next_from = next,
                "HubSpot pass complete"
            );
            st = State::starting_at(
                next,
                Pass {
                    high: st.pass.high,
                    ..Pass::default()
                },
            );
        }
        Ok(Page {
            observations,
            cursor: st.encode(),
            more,
            progress,
        })
    }

    fn search_body(&self, at: &Position) -> serde_json::Value {
        let (filters, sort) = match at {
            Position::Range {
                from, exclusive, ..
            } => (
                json!([{ "propertyName": "lastmodifieddate", "operator": if *exclusive { "GT" } else { "GTE" }, "value": from.to_string() }]),
                "lastmodifieddate",
            ),
            Position::Tie { at, after_id, .. } => (
                json!([
                    { "propertyName": "lastmodifieddate", "operator": "EQ", "value": at.to_string() },
                    { "propertyName": "hs_object_id", "operator": "GT", "value": after_id.to_string() },
                ]),
                "hs_object_id",
            ),
        };
        json!({
            "filterGroups": [{ "filters": filters }],
            "sorts": [{ "propertyName": sort, "direction": "ASCENDING" }],
            "properties": self.config.search_properties(),
            "limit": self.config.page_size,
        })
    }

    fn snapshot(&self, r: &Read) -> RecordSnapshot {
        let cfg = &self.config;
        let prop = |name: &str| {
            r.contact
                .properties
                .get(name)
                .and_then(|v| v.as_deref())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let raw = prop(&cfg.consent_property);
        let value = match raw {
            Some(v) if v == cfg.opted_out_value => Some(Status::OptedOut),
            Some(v) if v == cfg.opted_in_value => Some(Status::OptedIn),
            _ => None,
        };
        RecordSnapshot {
            record: r.contact.id.clone(),
            phones: cfg
                .phone_properties
                .iter()
                .filter_map(|p| prop(p))
                .map(String::from)
                .collect(),
            value,
            changed_at: prop(&cfg.changed_at_property).and_then(Timestamp::parse),
            modified_at: Timestamp::from_millis(r.modified),
            evidence: format!("{}={}", cfg.consent_property, raw.unwrap_or("")),
        }
    }
}

fn read(contact: Contact) -> Result<Read, ConnectorError> {
    let id = contact.id.parse::<u64>().map_err(|_| {
        ConnectorError::Transient(format!(
            "HubSpot returned a contact with a non-numeric id {:?}",
            contact.id
        ))
    })?;
    let modified = contact
        .properties
        .get("lastmodifieddate")
        .and_then(|v| v.as_deref())
        .or(contact.updated_at.as_deref())
        .and_then(Timestamp::parse)
        .ok_or_else(|| {
            ConnectorError::Transient(format!(
                "HubSpot returned contact {id} without lastmodifieddate"
            ))
        })?;
    Ok(Read {
        id,
        modified: modified.millis(),
        contact,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_refuses_garbage() {
        let st = State {
            v: 1,
            at: Position::Tie {
                at: 5,
                after_id: 7,
                seen: vec![9],
            },
            pass: Pass {
                started: Some(1),
                high: 5,
                done: 3,
                total: Some(10),
            },
        };
        assert_eq!(State::decode(&st.encode()).unwrap(), st);
        assert!(State::decode(&Cursor("{\"v\":9}".into())).is_err());
        assert!(State::decode(&Cursor("x".into())).is_err());
    }
}
