//! The one-line summary of a scenario: printed, and appended as one JSON object per line to
//! `target/faults-report.txt` so a script can build the results table.
//!
//! Fields: `scenario`, `fault`, `status` (`pass` | `fail` | `setup-error`), `written`
//! (committed transactions), `rolled_back`, `maybe`, `subscribers` (per name: `expected`,
//! `delivered`, `unique`, `missing`, `forbidden`, `duplicates`, `out_of_order`,
//! `latency_ms` [p50, p99, max]), `recovery_ms` (fault end → first change received after it),
//! `readyz` (every distinct answer in order, with ms relative to the fault start), `rss_mb`
//! ({`before_fault`, `end`, `hwm`}), `notes`, `failures`, `unix_ms`.

use std::io::Write;

use serde_json::{json, Value};

use crate::check::{Expect, SubResult};
use crate::clock::now_ms;
use crate::paths::target_dir;
use crate::scenario::{Options, Scenario};
use crate::writer::{Attempt, Outcome};

#[derive(Debug, Clone)]
pub struct Report(pub Value);

impl Report {
    pub fn setup_failure(opts: &Options, msg: &str) -> Report {
        Report(json!({
            "scenario": opts.name,
            "fault": opts.fault,
            "status": "setup-error",
            "failures": [msg],
            "unix_ms": now_ms(),
        }))
    }

    pub fn build(
        s: &Scenario,
        attempts: &[Attempt],
        _expect: &Expect,
        results: &[SubResult],
    ) -> Report {
        let count = |f: fn(&Outcome) -> bool| attempts.iter().filter(|a| f(&a.outcome)).count();
        let written = count(|o| matches!(o, Outcome::Committed { .. }));
        let rolled_back = count(|o| matches!(o, Outcome::RolledBack));
        let maybe = count(|o| matches!(o, Outcome::Maybe));
        let start = s.marks.fault_start.unwrap_or(0);
        let readyz: Vec<Value> = s
            .readyz
            .transitions()
            .iter()
            .map(|t| json!({ "at_ms": t.t_ms - start, "answer": t.label() }))
            .collect();
        let subs: serde_json::Map<String, Value> = results
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    json!({
                        "expected": r.expected,
                        "delivered": r.delivered,
                        "unique": r.unique,
                        "missing": r.missing.len(),
                        "forbidden": r.forbidden.len(),
                        "duplicates": r.duplicates,
                        "out_of_order": r.out_of_order,
                        "latency_ms": r.latency.map(|(a, b, c)| vec![a, b, c]),
                    }),
                )
            })
            .collect();
        let rss = s.server.rss();
        Report(json!({
            "scenario": s.opts.name,
            "fault": s.opts.fault,
            "status": if s.failures.is_empty() { "pass" } else { "fail" },
            "written": written,
            "rolled_back": rolled_back,
            "maybe": maybe,
            "subscribers": subs,
            "recovery_ms": s.marks.recovery_ms,
            "readyz": readyz,
            "rss_mb": {
                "before_fault": s.marks.rss_before_fault_kb.map(|k| k / 1024),
                "end": rss.map(|r| r.rss_kb / 1024),
                "hwm": rss.map(|r| r.hwm_kb / 1024),
            },
            "notes": s.notes,
            "failures": s.failures,
            "unix_ms": now_ms(),
        }))
    }

    /// `FAULTS <scenario> <status> | fault | written … | per subscriber … | recovery | readyz`.
    pub fn human(&self) -> String {
        let v = &self.0;
        let subs = v["subscribers"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, r)| {
                        format!(
                            "{k} {}/{} dup {}",
                            r["unique"], r["expected"], r["duplicates"]
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let readyz = v["readyz"]
            .as_array()
            .map(|a| {
                let mut labels: Vec<String> = a
                    .iter()
                    .map(|t| t["answer"].as_str().unwrap_or("").to_string())
                    .collect();
                labels.dedup();
                labels.join(" -> ")
            })
            .unwrap_or_default();
        format!(
            "FAULTS {} {} | fault: {} | written {} (rolled back {}, maybe {}) | {} | recovery {} | readyz: {} | rss hwm {} MB | {} failure(s)",
            v["scenario"].as_str().unwrap_or(""),
            v["status"].as_str().unwrap_or("").to_uppercase(),
            v["fault"].as_str().unwrap_or(""),
            v["written"],
            v["rolled_back"],
            v["maybe"],
            subs,
            match v["recovery_ms"].as_i64() {
                Some(ms) => format!("{ms} ms"),
                None => "-".into(),
            },
            readyz,
            v["rss_mb"]["hwm"],
            v["failures"].as_array().map(|a| a.len()).unwrap_or(0),
        )
    }
}

/// Append the report to `target/faults-report.txt`.
pub fn write(r: &Report) {
    let path = target_dir().join("faults-report.txt");
    let _ = std::fs::create_dir_all(target_dir());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        let _ = writeln!(f, "{}", r.0);
    }
    if r.0["status"] == "setup-error" {
        announce(r);
    }
}

/// Print the summary line where `cargo test` shows it for passing tests too: libtest captures
/// the `print!` macros only, not writes to the stdout handle.
pub fn announce(r: &Report) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", r.human());
    let _ = out.flush();
}
