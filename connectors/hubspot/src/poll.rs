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

impl Position {
    /// Whether this pass reported the contact already (an id at the boundary timestamp).
    fn reported(&self, id: u64, modified: i64) -> bool {
        match self {
            Position::Range {
                from,
                exclusive: false,
                seen,
            } => modified == *from && seen.contains(&id),
            Position::Range {
                exclusive: true, ..
            } => false,
            Position::Tie { seen, .. } => seen.contains(&id),
        }
    }

    /// Where the pass goes after a page of `(id, lastmodifieddate)`; `None` when the pass
    /// is complete. `full` says the page had as many results as asked for.
    fn after_page(self, page: &[(u64, i64)], full: bool) -> Option<Position> {
        match self {
            Position::Range { .. } if !full => None,
            Position::Range {
                from,
                exclusive,
                seen,
            } => {
                let low = page.iter().map(|r| r.1).min().unwrap_or(from);
                let high = page.iter().map(|r| r.1).max().unwrap_or(from);
                let mut at_high: Vec<u64> =
                    page.iter().filter(|r| r.1 == high).map(|r| r.0).collect();
                if low < high {
                    return Some(Position::Range {
                        from: high,
                        exclusive: false,
                        seen: at_high,
                    });
                }
                // The whole page shares one timestamp, so `>= high` cannot move on: walk
                // that timestamp by id.
                if high == from && !exclusive {
                    at_high.extend(seen);
                    at_high.sort_unstable();
                    at_high.dedup();
                }
                Some(Position::Tie {
                    at: high,
                    after_id: 0,
                    seen: at_high,
                })
            }
            Position::Tie { at, .. } if !full => Some(Position::Range {
                from: at,
                exclusive: true,
                seen: Vec::new(),
            }),
            Position::Tie {
                at,
                after_id,
                mut seen,
            } => {
                let last = page.iter().map(|r| r.0).max().unwrap_or(after_id);
                // The query excludes ids up to `last` from now on.
                seen.retain(|id| *id > last);
                Some(Position::Tie {
                    at,
                    after_id: last,
                    seen,
                })
            }
        }
    }
}

impl HubSpot {
    pub(crate) async fn poll_page(&self, cursor: Option<&Cursor>) -> Result<Page, ConnectorError> {
        let st = match cursor {
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
        let full = parsed.results.len() >= self.config.page_size;
        let reads = parsed
            .results
            .into_iter()
            .map(read)
            .collect::<Result<Vec<_>, _>>()?;

        let observations: Vec<Observation> = reads
            .iter()
            .filter(|r| !st.at.reported(r.id, r.modified))
            .map(|r| Observation::Record(self.snapshot(r)))
            .collect();
        let mut pass = st.pass;
        pass.started = pass.started.or(resp.date.map(Timestamp::millis));
        pass.high = reads.iter().map(|r| r.modified).fold(pass.high, i64::max);
        if let (Position::Range { .. }, Some(t)) = (&st.at, parsed.total) {
            // `total` counts what is left from this page on.
            pass.total = Some(pass.done + t);
        }
        pass.done += observations.len() as u64;
        let progress = Some(Progress {
            done: pass.done,
            total: pass.total,
        });

        let keys: Vec<(u64, i64)> = reads.iter().map(|r| (r.id, r.modified)).collect();
        let (next, more) = match st.at.after_page(&keys, full) {
            Some(at) => (State { v: st.v, at, pass }, true),
            None => {
                // Caught up: the next pass re-reads the overlap window (see the module doc).
                let overlap = self.config.overlap.as_millis() as i64;
                let from = match pass.started {
                    Some(started) => started - overlap - DATE_RESOLUTION_MS,
                    None => pass.high - overlap,
                };
                tracing::debug!(connector = %self.name, done = pass.done, next_from = from, "HubSpot pass complete");
                (
                    State::starting_at(
                        from.max(0),
                        Pass {
                            high: pass.high,
                            ..Pass::default()
                        },
                    ),
                    false,
                )
            }
        };
        Ok(Page {
            observations,
            cursor: next.encode(),
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
        let status = |raw: Option<&str>| match raw {
            Some(v) if v == cfg.opted_out_value => Some(Status::OptedOut),
            Some(v) if v == cfg.opted_in_value => Some(Status::OptedIn),
            _ => None,
        };
        let raw = prop(&cfg.consent_property);
        let mut evidence = format!("{}={}", cfg.consent_property, raw.unwrap_or(""));
        let marketing = cfg.marketing().and_then(|m| {
            let raw = prop(m);
            evidence.push_str(&format!(" {m}={}", raw.unwrap_or("")));
            status(raw)
        });
        RecordSnapshot {
            record: r.contact.id.clone(),
            phones: cfg
                .phone_properties
                .iter()
                .filter_map(|p| prop(p))
                .map(String::from)
                .collect(),
            value: status(raw),
            marketing,
            changed_at: prop(&cfg.changed_at_property).and_then(Timestamp::parse),
            modified_at: Timestamp::from_millis(r.modified),
            evidence,
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
    fn a_full_page_on_one_timestamp_switches_to_an_id_walk_and_back() {
        let start = Position::Range {
            from: 10,
            exclusive: false,
            seen: vec![],
        };
        // A short range page ends the pass.
        assert_eq!(start.clone().after_page(&[(1, 10)], false), None);
        // A full page ending at 20: continue at >= 20, skipping the ids already read there.
        let next = start
            .after_page(&[(5, 10), (3, 20), (9, 20)], true)
            .unwrap();
        assert_eq!(
            next,
            Position::Range {
                from: 20,
                exclusive: false,
                seen: vec![3, 9]
            }
        );
        assert!(next.reported(9, 20) && !next.reported(9, 21) && !next.reported(4, 20));
        // A full page entirely at 20: walk 20 by id, remembering all ids reported at 20.
        let tie = next.after_page(&[(9, 20), (4, 20), (7, 20)], true).unwrap();
        assert_eq!(
            tie,
            Position::Tie {
                at: 20,
                after_id: 0,
                seen: vec![3, 4, 7, 9]
            }
        );
        let tie = tie.after_page(&[(1, 20), (3, 20), (4, 20)], true).unwrap();
        assert_eq!(
            tie,
            Position::Tie {
                at: 20,
                after_id: 4,
                seen: vec![7, 9]
            }
        );
        // The walk ends on a short page and the range goes on strictly after 20.
        let after = tie.after_page(&[(7, 20)], false).unwrap();
        assert_eq!(
            after,
            Position::Range {
                from: 20,
                exclusive: true,
                seen: vec![]
            }
        );
        assert!(!after.reported(7, 20));
    }

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
