//! The assertions every scenario ends with. Each broken expectation is recorded as one
//! failure line; nothing stops at the first.

use std::collections::{HashMap, HashSet};

use crate::scenario::Scenario;
use crate::subscriber::Line;
use crate::writer::{Attempt, Outcome};

/// The message of a transient loss, from the spec.
pub const STREAM_DOWN: &str =
    "Replication stream is down: changes will be delivered once it is back";
pub const STREAM_STOPPED_PREFIX: &str = "Replication stopped:";
pub const SUBSCRIBED: &str = "Subscribed to PostgreSQL";
pub const RESYNC: &str = "ResyncRequired: the replication slot was recreated; changes committed meanwhile were lost, refetch your data";
/// The at-least-once window of the spec: the last <= 1,000 changes per loss.
pub const DUP_WINDOW: usize = 1000;

/// What the replication stream goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// It must not be lost at all.
    None,
    /// Lost and back. `readyz_must_show`: the outage lasts long enough that `/readyz` must be
    /// seen saying `replication stream lost`.
    Transient { readyz_must_show: bool },
    /// It may ride the fault out (no messages, no duplicates) or notice and come back.
    MaybeTransient,
    /// Stopped for good (slot gone or invalidated).
    Definite,
    /// The slot was lost and walcast (`--recreate-slot`) made a new one: channels are told
    /// `ResyncRequired`, then streaming resumes.
    Recreated,
}

/// Which committed rows must have been delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completeness {
    All,
    /// Only those up to the id every subscriber had before the fault.
    BeforeFault,
    /// Those, and those committed (acknowledged) after this wall-clock ms.
    BeforeFaultAndAfter(i64),
}

impl Completeness {
    pub fn wants_tail(&self) -> bool {
        !matches!(self, Completeness::BeforeFault)
    }
}

#[derive(Debug, Clone)]
pub struct Expect {
    pub loss: Loss,
    pub complete: Completeness,
    /// Duplicates allowed per subscriber.
    pub dup_budget: usize,
    /// How long the final catch-up may take.
    pub final_wait_secs: u64,
    /// VmHWM ceiling.
    pub rss_limit_kb: u64,
    /// VmHWM over the RSS just before the fault.
    pub rss_growth_limit_kb: Option<u64>,
    /// Subscribers whose socket may be closed (and whose rows are then not checked).
    pub may_disconnect: Vec<String>,
    /// Subscribers that must get a postgres_changes `system` error after the fault started.
    pub system_error_for: Vec<String>,
    /// (subscribers, ms): their commit-to-receive latency of rows committed during the fault
    /// must stay under ms.
    pub latency_during_fault: Option<(Vec<String>, i64)>,
}

impl Expect {
    fn base(loss: Loss, complete: Completeness, dup_budget: usize) -> Expect {
        Expect {
            loss,
            complete,
            dup_budget,
            final_wait_secs: 30,
            rss_limit_kb: crate::knobs::knob("FAULTS_RSS_LIMIT_MB", 256) * 1024,
            rss_growth_limit_kb: None,
            may_disconnect: Vec::new(),
            system_error_for: Vec::new(),
            latency_during_fault: None,
        }
    }

    /// A transient loss: everything delivered, duplicates within one window.
    pub fn transient(readyz_must_show: bool) -> Expect {
        Expect::base(
            Loss::Transient { readyz_must_show },
            Completeness::All,
            DUP_WINDOW,
        )
    }

    /// The stream may or may not notice.
    pub fn maybe_transient() -> Expect {
        Expect::base(Loss::MaybeTransient, Completeness::All, DUP_WINDOW)
    }

    /// The stream must not be lost: everything delivered exactly once.
    pub fn no_loss() -> Expect {
        Expect::base(Loss::None, Completeness::All, 0)
    }

    /// Replication stops for good.
    pub fn definite() -> Expect {
        Expect::base(Loss::Definite, Completeness::BeforeFault, 0)
    }

    /// The slot was recreated: rows from before the fault and those committed after
    /// `after_ms` (when the resync was announced) must arrive.
    pub fn recreated(after_ms: i64) -> Expect {
        Expect::base(
            Loss::Recreated,
            Completeness::BeforeFaultAndAfter(after_ms),
            DUP_WINDOW,
        )
    }
}

/// Per subscriber figures.
#[derive(Debug, Clone, Default)]
pub struct SubResult {
    pub name: String,
    /// Rows it had to receive.
    pub expected: usize,
    /// Change events received (duplicates included).
    pub delivered: usize,
    pub unique: usize,
    pub missing: Vec<i64>,
    pub forbidden: Vec<i64>,
    pub duplicates: usize,
    pub out_of_order: usize,
    /// Commit-to-receive latency (ms) of first deliveries: p50, p99, max.
    pub latency: Option<(i64, i64, i64)>,
}

/// Ids at or above this are the bulk transaction's, not the writer's.
pub const BULK_BASE: i64 = 1_000_000_000;

pub fn run(s: &mut Scenario, attempts: &[Attempt], expect: &Expect) -> Vec<SubResult> {
    let by_id: HashMap<i64, &Attempt> = attempts.iter().map(|a| (a.id, a)).collect();
    let fault_start = s.marks.fault_start.unwrap_or(i64::MAX);
    let fault_end = s.marks.fault_end.unwrap_or(i64::MAX);

    // The server is alive.
    s.server_gone("by the end");

    // Sockets stayed up.
    for sub in &s.subs {
        if expect.may_disconnect.iter().any(|n| n == sub.name()) {
            continue;
        }
        let drops = sub.socket_drops();
        let bad = sub.bad_statuses();
        if !drops.is_empty() || !bad.is_empty() {
            let msg = format!(
                "subscriber {} was disconnected or lost a channel: socket {:?}, channels {:?}",
                sub.name(),
                drops,
                bad
            );
            s.failures.push(msg);
        }
    }

    // Deliveries.
    let synced = s.marks.synced_before_fault;
    let must = |id: i64, a: &Attempt| -> bool {
        let Outcome::Committed { ack_ms } = a.outcome else {
            return false;
        };
        match expect.complete {
            Completeness::All => true,
            Completeness::BeforeFault => synced.is_some_and(|x| id <= x),
            Completeness::BeforeFaultAndAfter(ms) => synced.is_some_and(|x| id <= x) || ack_ms > ms,
        }
    };
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for aud in s.audience.clone() {
        if aud.tables.is_empty() {
            continue;
        }
        let sub = s.sub(&aud.name);
        let mut r = SubResult {
            name: aud.name.clone(),
            ..Default::default()
        };
        let mut lat = Vec::new();
        let mut lat_fault = Vec::new();
        for table in &aud.tables {
            let got = sub.changes(table);
            r.delivered += got.len();
            let mut seen: HashMap<i64, usize> = HashMap::new();
            let (mut top_writer, mut top_bulk) = (i64::MIN, i64::MIN);
            for (id, t) in &got {
                let n = seen.entry(*id).or_default();
                *n += 1;
                if *n > 1 {
                    r.duplicates += 1;
                    continue;
                }
                let top = if *id >= BULK_BASE {
                    &mut top_bulk
                } else {
                    &mut top_writer
                };
                if *id < *top {
                    r.out_of_order += 1;
                }
                *top = (*top).max(*id);
                let allowed_extra = s
                    .extra_committed
                    .iter()
                    .any(|(tb, range)| tb == table && range.contains(id));
                let ok = aud.may_see(table, *id)
                    && (allowed_extra
                        || by_id
                            .get(id)
                            .is_some_and(|a| !matches!(a.outcome, Outcome::RolledBack)));
                if !ok {
                    r.forbidden.push(*id);
                }
                if let Some(Attempt {
                    outcome: Outcome::Committed { ack_ms },
                    ..
                }) = by_id.get(id)
                {
                    lat.push(t - ack_ms);
                    if *ack_ms >= fault_start && *ack_ms <= fault_end {
                        lat_fault.push(t - ack_ms);
                    }
                }
            }
            r.unique += seen.len();
            for a in attempts {
                if aud.may_see(table, a.id) && must(a.id, a) {
                    r.expected += 1;
                    if !seen.contains_key(&a.id) {
                        r.missing.push(a.id);
                    }
                }
            }
            for (tb, range) in &s.extra_committed {
                if tb == table && expect.complete == Completeness::All {
                    for id in range.clone() {
                        if aud.may_see(table, id) {
                            r.expected += 1;
                            if !seen.contains_key(&id) {
                                r.missing.push(id);
                            }
                        }
                    }
                }
            }
        }
        r.latency = percentiles(&mut lat);
        let disconnected_ok = expect.may_disconnect.contains(&aud.name);
        if !r.missing.is_empty() && !disconnected_ok {
            failures.push(format!(
                "{}: {} of {} committed rows it may see were not delivered (first: {:?})",
                r.name,
                r.missing.len(),
                r.expected,
                &r.missing[..r.missing.len().min(8)]
            ));
        }
        if !r.forbidden.is_empty() {
            failures.push(format!(
                "{}: {} rows delivered that it may not see or that were rolled back (first: {:?})",
                r.name,
                r.forbidden.len(),
                &r.forbidden[..r.forbidden.len().min(8)]
            ));
        }
        if r.out_of_order > 0 {
            failures.push(format!(
                "{}: {} rows delivered out of commit order",
                r.name, r.out_of_order
            ));
        }
        if r.duplicates > expect.dup_budget {
            failures.push(format!(
                "{}: {} duplicate deliveries (allowed here: {})",
                r.name, r.duplicates, expect.dup_budget
            ));
        }
        if let Some((names, limit)) = &expect.latency_during_fault {
            if names.contains(&aud.name) {
                match lat_fault.iter().max() {
                    Some(max) if *max >= *limit => failures.push(format!(
                        "{}: commit-to-receive latency reached {max} ms during the fault (limit {limit} ms; p99 {:?})",
                        r.name,
                        percentiles(&mut lat_fault.clone()).map(|p| p.1)
                    )),
                    Some(_) => {}
                    None => failures.push(format!(
                        "{}: received no row committed during the fault",
                        r.name
                    )),
                }
            }
        }
        results.push(r);
    }
    s.failures.extend(failures);

    check_readyz(s, expect, fault_start);
    check_system(s, expect, fault_start);

    // Memory.
    match s.server.rss() {
        Some(rss) => {
            if rss.hwm_kb > expect.rss_limit_kb {
                let msg = format!(
                    "walcast VmHWM {} MB over the {} MB limit",
                    rss.hwm_kb / 1024,
                    expect.rss_limit_kb / 1024
                );
                s.fail(msg);
            }
            if let (Some(limit), Some(before)) =
                (expect.rss_growth_limit_kb, s.marks.rss_before_fault_kb)
            {
                if rss.hwm_kb.saturating_sub(before) > limit {
                    let msg = format!(
                        "walcast VmHWM {} MB grew {} MB over its RSS before the fault ({} MB; limit {} MB)",
                        rss.hwm_kb / 1024,
                        (rss.hwm_kb - before) / 1024,
                        before / 1024,
                        limit / 1024
                    );
                    s.fail(msg);
                }
            }
        }
        None => {
            if s.server.exited().is_none() {
                s.fail("cannot read walcast's /proc status");
            }
        }
    }
    results
}

fn check_readyz(s: &mut Scenario, expect: &Expect, fault_start: i64) {
    let transitions = s.readyz.transitions();
    let allowed = [
        "not ready: starting",
        "not ready: replication stream lost",
        "not ready: replication stopped",
        "not ready: shutting down",
    ];
    let mut failures = Vec::new();
    for t in &transitions {
        match t.code {
            200 if t.body == "ready" => {}
            503 if allowed.iter().any(|p| t.body.starts_with(p)) => {}
            0 => failures.push(format!(
                "/readyz gave no answer at +{} ms after the fault started",
                t.t_ms - fault_start.min(t.t_ms)
            )),
            _ => failures.push(format!(
                "/readyz said {:?}, not an answer of the spec",
                t.label()
            )),
        }
    }
    failures.dedup();
    let after: Vec<_> = transitions
        .iter()
        .filter(|t| t.t_ms >= fault_start)
        .collect();
    let last = transitions.last().map(|t| t.label()).unwrap_or_default();
    let saw_lost = after
        .iter()
        .any(|t| t.code == 503 && t.body.starts_with("not ready: replication stream lost"));
    if expect.loss
        == (Loss::Transient {
            readyz_must_show: true,
        })
        && !saw_lost
    {
        failures.push(format!(
            "/readyz never said `not ready: replication stream lost` during the outage (saw {:?})",
            after.iter().map(|t| t.label()).collect::<Vec<_>>()
        ));
    }
    if expect.loss == Loss::Definite && !last.starts_with("503 not ready: replication stopped") {
        failures.push(format!(
            "/readyz ends with {last:?}, not `503 not ready: replication stopped`"
        ));
    }
    // The metric agrees with readiness (1 exactly while streaming).
    let metric = s.marks.streaming_metric_end;
    if s.server.exited().is_none() {
        let want = if last == "200 ready" { 1.0 } else { 0.0 };
        if metric != Some(want) {
            failures.push(format!(
                "walcast_replication_streaming is {metric:?} while /readyz says {last:?}"
            ));
        }
    }
    if expect.loss != Loss::Definite && last != "200 ready" {
        failures.push(format!("/readyz ends with {last:?}, not `200 ready`"));
    }
    s.failures.extend(failures);
}

fn check_system(s: &mut Scenario, expect: &Expect, fault_start: i64) {
    let mut failures = Vec::new();
    let readyz_saw_loss = s
        .readyz
        .transitions()
        .iter()
        .any(|t| t.t_ms >= fault_start && t.code != 200);
    for aud in s.audience.clone() {
        if aud.tables.is_empty() {
            continue;
        }
        let sys: Vec<(String, String, i64)> = s
            .sub(&aud.name)
            .system("changes")
            .into_iter()
            .filter(|(_, _, t)| *t >= fault_start)
            .collect();
        let errors: Vec<&(String, String, i64)> =
            sys.iter().filter(|(st, _, _)| st == "error").collect();
        if expect.system_error_for.contains(&aud.name) {
            if errors.is_empty() {
                failures.push(format!(
                    "{}: no postgres_changes system error after the fault (got {:?})",
                    aud.name, sys
                ));
            }
            continue;
        }
        if expect.may_disconnect.contains(&aud.name) {
            continue;
        }
        let down = sys
            .iter()
            .position(|(st, m, _)| st == "error" && m == STREAM_DOWN);
        let back_after = |i: usize| {
            sys[i..]
                .iter()
                .any(|(st, m, _)| st == "ok" && m == SUBSCRIBED)
        };
        match expect.loss {
            Loss::None => {
                if !errors.is_empty() {
                    failures.push(format!(
                        "{}: postgres_changes system error(s) though the stream was not lost: {:?}",
                        aud.name, errors
                    ));
                }
            }
            Loss::Transient { .. } | Loss::MaybeTransient => {
                let required = matches!(expect.loss, Loss::Transient { .. })
                    || readyz_saw_loss
                    || !errors.is_empty();
                if !required {
                    continue;
                }
                match down {
                    None => failures.push(format!(
                        "{}: no system error {STREAM_DOWN:?} after the stream was lost (got {:?})",
                        aud.name, sys
                    )),
                    Some(i) if !back_after(i) => failures.push(format!(
                        "{}: no system ok {SUBSCRIBED:?} after the stream came back (got {:?})",
                        aud.name, sys
                    )),
                    _ => {}
                }
            }
            Loss::Recreated => match sys
                .iter()
                .position(|(st, m, _)| st == "error" && m == RESYNC)
            {
                None => failures.push(format!(
                    "{}: no system error {RESYNC:?} after the slot was recreated (got {:?})",
                    aud.name, sys
                )),
                Some(i) if !back_after(i) => failures.push(format!(
                    "{}: no system ok {SUBSCRIBED:?} after the resync message (got {:?})",
                    aud.name, sys
                )),
                _ => {}
            },
            Loss::Definite => {
                if !errors
                    .iter()
                    .any(|(_, m, _)| m.starts_with(STREAM_STOPPED_PREFIX))
                {
                    failures.push(format!(
                        "{}: no system error starting {STREAM_STOPPED_PREFIX:?} (got {:?})",
                        aud.name, sys
                    ));
                }
            }
        }
    }
    s.failures.extend(failures);
}

/// p50, p99, max of `v` (sorted in place).
pub fn percentiles(v: &mut [i64]) -> Option<(i64, i64, i64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some((at(0.5), at(0.99), *v.last().unwrap()))
}

/// Row shapes: (delivered, mismatched ids with what was expected and got).
pub fn shapes(s: &Scenario, name: &str, attempts: &[Attempt]) -> (usize, Vec<String>) {
    let want: HashMap<i64, HashMap<String, String>> = attempts
        .iter()
        .filter_map(|a| {
            let obj = a.shape.as_ref()?.as_object()?;
            Some((
                a.id,
                obj.iter()
                    .map(|(k, v)| (k.clone(), json_type(v).to_string()))
                    .collect(),
            ))
        })
        .collect();
    let mut checked = 0;
    let mut bad = Vec::new();
    let mut seen = HashSet::new();
    s.sub(name).with_lines(|lines| {
        for l in lines {
            if let Line::Change {
                table,
                id,
                shape: Some(shape),
                ..
            } = l
            {
                if table != "events" || !seen.insert(*id) {
                    continue;
                }
                let Some(w) = want.get(id) else { continue };
                checked += 1;
                let got: HashMap<String, String> = shape
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("?").to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                if &got != w {
                    bad.push(format!("id {id}: want {w:?}, got {got:?}"));
                }
            }
        }
    });
    (checked, bad)
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::percentiles;

    #[test]
    fn percentiles_of_a_sample() {
        assert_eq!(percentiles(&mut []), None);
        let mut v: Vec<i64> = (1..=100).rev().collect();
        assert_eq!(percentiles(&mut v), Some((51, 99, 100)));
        assert_eq!(percentiles(&mut [7]), Some((7, 7, 7)));
    }
}
