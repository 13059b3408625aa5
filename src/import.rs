//! `optout-sync import`: seeds the store from an existing suppression list.
//!
//! CSV with a header row naming the columns `phone`, `status`, `time` and optionally
//! `source`. Each good row becomes an observation of signal `import`; bad rows are
//! reported by line and skipped. Rows are applied in pages, each in one transaction, so
//! no row is ever half-applied. A row's identity is its content: importing the same file
//! twice changes nothing the second time.

use std::io::Read;

use optout_core::{ConsentEvent, Identity, Observation, Signal, Status, Timestamp};
use sha2::{Digest, Sha256};

use crate::reconcile::Engine;
use crate::store::StoreError;

/// The pseudo-connector imports are recorded under.
pub const SOURCE: &str = "import";
const PAGE: usize = 500;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub applied: usize,
    pub duplicates: usize,
    /// (line number, problem); empty from [`import_streaming`], which hands them out.
    pub bad: Vec<(u64, String)>,
    pub bad_rows: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the CSV header must name the columns phone, status and time (found: {0})")]
    Header(String),
    #[error("cannot read the CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Parses a status as people write it in suppression lists.
pub fn parse_status(s: &str) -> Option<Status> {
    match s
        .trim()
        .to_ascii_lowercase()
        .replace(['-', ' '], "_")
        .as_str()
    {
        "opted_out" | "opt_out" | "optout" | "out" | "unsubscribed" | "stop" | "suppressed" => {
            Some(Status::OptedOut)
        }
        "opted_in" | "opt_in" | "optin" | "in" | "subscribed" => Some(Status::OptedIn),
        _ => None,
    }
}

/// Reads the CSV in `input` and applies its good rows to the store, page by page.
pub fn import(
    engine: &Engine,
    input: impl Read,
    now: Timestamp,
) -> Result<ImportReport, ImportError> {
    let mut bad = Vec::new();
    let mut report = import_streaming(
        engine,
        input,
        now,
        |line, why| bad.push((line, why)),
        |_| {},
    )?;
    report.bad = bad;
    Ok(report)
}

/// [`import`] in constant memory, for the running daemon: each bad row goes to `on_bad`
/// as it is found (not into the report), and each applied page to `on_page` (which wakes
/// the push workers at once).
pub fn import_streaming(
    engine: &Engine,
    input: impl Read,
    now: Timestamp,
    mut on_bad: impl FnMut(u64, String),
    mut on_page: impl FnMut(&crate::reconcile::ApplyReport),
) -> Result<ImportReport, ImportError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(input);
    let columns = Columns::from_headers(reader.headers()?)?;
    let mut report = ImportReport::default();
    let mut page = Vec::with_capacity(PAGE);
    let mut apply_page = |page: &mut Vec<Observation>, report: &mut ImportReport| {
        apply(engine, page, report, now).map(|r| r.inspect(&mut on_page))
    };
    for row in reader.records() {
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                report.bad_rows += 1;
                on_bad(line, e.to_string());
                continue;
            }
        };
        let line = row.position().map(|p| p.line()).unwrap_or(0);
        match columns.observation(engine, &row, line) {
            Ok(observation) => page.push(observation),
            Err(why) => {
                report.bad_rows += 1;
                on_bad(line, why);
            }
        }
        if page.len() >= PAGE {
            apply_page(&mut page, &mut report)?;
        }
    }
    apply_page(&mut page, &mut report)?;
    Ok(report)
}

/// Where each field is in a row, found by the header's column names (in any case).
struct Columns {
    phone: usize,
    status: usize,
    time: usize,
    source: Option<usize>,
}

impl Columns {
    fn from_headers(headers: &csv::StringRecord) -> Result<Self, ImportError> {
        let headers: Vec<String> = headers.iter().map(|h| h.to_ascii_lowercase()).collect();
        let col = |name: &str| headers.iter().position(|h| h == name);
        let (Some(phone), Some(status), Some(time)) = (col("phone"), col("status"), col("time"))
        else {
            return Err(ImportError::Header(headers.join(",")));
        };
        Ok(Self {
            phone,
            status,
            time,
            source: col("source"),
        })
    }

    /// The observation a row stands for, or why the row is bad.
    fn observation(
        &self,
        engine: &Engine,
        row: &csv::StringRecord,
        line: u64,
    ) -> Result<Observation, String> {
        let field = |i: usize| row.get(i).unwrap_or("").to_string();
        let raw_phone = field(self.phone);
        if let Err(why) = engine.normalizer().phone(&raw_phone) {
            return Err(format!("phone `{}`: {why}", shorten(&raw_phone)));
        }
        let Some(st) = parse_status(&field(self.status)) else {
            return Err(format!(
                "status `{}` is neither opted_out nor opted_in",
                shorten(&field(self.status))
            ));
        };
        let Some(at) = Timestamp::parse(&field(self.time)) else {
            return Err(format!(
                "time `{}` is not a date-time (use RFC 3339, e.g. 2024-05-01T10:00:00Z)",
                shorten(&field(self.time))
            ));
        };
        let src = self
            .source
            .map(field)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "suppression list".into());
        // The row's content is its identity, so importing the same file again is a no-op.
        let digest = Sha256::digest(format!("{raw_phone}|{}|{}|{src}", st.as_str(), at.millis()));
        let id = hex::encode(&digest[..12]);
        Ok(Observation::Event(ConsentEvent {
            identities: vec![Identity::Phone(raw_phone)],
            status: Some(st),
            signal: Signal::Import,
            at,
            inbound: false,
            message_id: Some(format!("row:{id}")),
            evidence: format!("line {line} of import: {}", shorten(&src)),
            language: None,
            scope: None,
            possible_opt_out: false,
        }))
    }
}

fn apply(
    engine: &Engine,
    page: &mut Vec<Observation>,
    report: &mut ImportReport,
    now: Timestamp,
) -> Result<Option<crate::reconcile::ApplyReport>, StoreError> {
    if page.is_empty() {
        return Ok(None);
    }
    let r = engine.apply_page(SOURCE, page, None, now)?;
    report.duplicates += r.results.get("duplicate").copied().unwrap_or(0) as usize;
    report.applied += page.len() - r.results.get("duplicate").copied().unwrap_or(0) as usize;
    page.clear();
    Ok(Some(r))
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(40).collect();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Normalizer;
    use crate::policy::{Decision, PolicyConfig};
    use crate::reconcile::Takes;
    use optout_core::Scope;
    use std::collections::BTreeMap;

    #[test]
    fn good_rows_apply_bad_rows_are_reported_by_line_and_reimport_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let e = Engine::new(
            crate::store::testing::open(dir.path()),
            PolicyConfig::default(),
            Normalizer::new(Normalizer::parse_region("US").unwrap()),
            BTreeMap::from([("hubspot".to_string(), Takes::Records)]),
        );
        let csv = "phone,status,time,source\n\
                   +1 415 555 2671,opted_out,2024-05-01T10:00:00Z,old ESP\n\
                   not-a-phone,opted_out,2024-05-01T10:00:00Z,old ESP\n\
                   (212) 555-0100,maybe,2024-05-01T10:00:00Z,old ESP\n\
                   2125550101,unsubscribed,yesterday,old ESP\n\
                   2125550102,STOP,2024-05-02,\n";
        let r = import(&e, csv.as_bytes(), Timestamp::now()).unwrap();
        assert_eq!(r.applied, 2);
        let lines: Vec<u64> = r.bad.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [3, 4, 5], "{:?}", r.bad);
        assert!(r.bad[1].1.contains("maybe"));
        for alias in ["p:+14155552671", "p:+12125550102"] {
            let s = e.store().subject_by_alias(alias).unwrap().unwrap();
            assert_eq!(
                s.consent.decide(Scope::All, e.policy().margin),
                Decision::OptedOut,
                "{alias}"
            );
        }
        assert_eq!(r.bad_rows, 3);
        let again = import(&e, csv.as_bytes(), Timestamp::now()).unwrap();
        assert_eq!((again.applied, again.duplicates), (0, 2));
        assert!(matches!(
            import(&e, "number,state\n1,2\n".as_bytes(), Timestamp::now()),
            Err(ImportError::Header(_))
        ));
    }
}
