//! The mass re-opt-in guard's threshold, window and hold rules.

use super::*;

const HOUR: Duration = Duration::from_secs(3600);

fn guard(max: u64) -> OptInGuard {
    OptInGuard { max, per: HOUR }
}

/// Runs `n` opt-ins at `at` through the guard; returns the verdicts and the window.
fn run(
    g: &OptInGuard,
    mut w: GuardWindow,
    at: Timestamp,
    n: usize,
) -> (Vec<GuardVerdict>, GuardWindow) {
    let mut out = Vec::new();
    for _ in 0..n {
        let (v, next) = g.judge(w, at);
        out.push(v);
        w = next;
    }
    (out, w)
}

#[test]
fn exactly_max_pass_and_the_next_is_held() {
    let start = Timestamp::from_secs(1_700_000_000 / 3600 * 3600);
    let (v, w) = run(&guard(3), GuardWindow::default(), start, 5);
    use GuardVerdict::*;
    assert_eq!(v, [Apply, Apply, Apply, Hold, Hold]);
    assert_eq!((w.current, w.held), (3, 2));
}

#[test]
fn a_source_with_held_opt_ins_stays_held_in_a_later_window() {
    let start = Timestamp::from_secs(1_700_000_000 / 3600 * 3600);
    let (_, w) = run(&guard(2), GuardWindow::default(), start, 3);
    let (v, _) = run(&guard(2), w, start.plus(HOUR * 5), 1);
    assert_eq!(v, [GuardVerdict::Hold]);
    // Once resolved (held back to 0), the new window lets `max` through again.
    let resolved = GuardWindow { held: 0, ..w };
    let (v, _) = run(&guard(2), resolved, start.plus(HOUR * 5), 3);
    use GuardVerdict::*;
    assert_eq!(v, [Apply, Apply, Hold]);
}

#[test]
fn the_previous_window_counts_for_what_still_overlaps() {
    let start = Timestamp::from_secs(1_700_000_000 / 3600 * 3600);
    // 10 applied late in one window…
    let (_, w) = run(
        &guard(10),
        GuardWindow::default(),
        start.plus(HOUR * 59 / 60),
        10,
    );
    // …a quarter into the next, three quarters of them still count: 7.5 → 2 more pass.
    let (v, _) = run(&guard(10), w, start.plus(HOUR + HOUR / 4), 4);
    use GuardVerdict::*;
    assert_eq!(v, [Apply, Apply, Apply, Hold]);
    // Two windows later nothing is left of them.
    let (v, _) = run(&guard(10), w, start.plus(HOUR * 3), 10);
    assert!(v.iter().all(|v| *v == Apply));
}

#[test]
fn only_an_opt_in_that_lifts_a_suppression_counts() {
    let f = |status, at: i64| Fact {
        status,
        scope: Scope::All,
        at: Timestamp::from_secs(at),
        source: "hubspot".into(),
        record: "c1".into(),
        signal: Signal::CrmField,
        evidence: String::new(),
    };
    let margin = Duration::from_secs(5);
    let mut out = Consent::default();
    out.record(&f(Status::OptedOut, 100));
    assert!(lifts_suppression(&out, &f(Status::OptedIn, 200), margin));
    // Within the margin the opt-out still wins: nothing is lifted.
    assert!(!lifts_suppression(&out, &f(Status::OptedIn, 103), margin));
    // An opt-in for someone not suppressed, and an opt-out, are never held.
    assert!(!lifts_suppression(
        &Consent::default(),
        &f(Status::OptedIn, 200),
        margin
    ));
    assert!(!lifts_suppression(&out, &f(Status::OptedOut, 300), margin));
}
