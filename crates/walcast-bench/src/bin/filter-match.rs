//! What a `match`/`imatch` filter costs on the hot path: compile time at join, and matching
//! throughput over values of several sizes, for ordinary patterns and for patterns that make
//! a backtracking matcher take exponential time. Nothing here talks to a database: it runs
//! the filter exactly as the hub does (`CompiledFilter::matches` on a change).
//!
//! ```text
//! cargo run --release -p walcast-bench --bin filter-match -- --value-bytes 1000,100000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use walcast_core::change::{Change, ChangeKind, Column, Table, Value};
use walcast_core::filter::{self, ColumnInfo};
use walcast_core::pg_type::TypeRegistry;
use walcast_pgoutput::{Lsn, ReplicaIdentity};

#[derive(Parser)]
struct Args {
    /// Value sizes to match against, in bytes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,10000,1000000")]
    value_bytes: Vec<usize>,
    /// Least time spent matching per (pattern, size).
    #[arg(long, default_value_t = 500)]
    millis: u64,
}

/// (label, filter); every value is all `a`, the worst input for the backtracking-hostile ones.
const CASES: &[(&str, &str)] = &[
    ("like, for comparison", "s=like.%needle%"),
    ("match: literal", "s=match.needle"),
    ("match: anchored", r#"s=match."^[a-z]+@example\.com$""#),
    (
        "imatch: classes + bounds",
        r#"s=imatch."\mneedle[[:digit:]]{1,3}\M""#,
    ),
    (
        "match: alternation",
        "s=match.(alpha|beta|gamma|delta|needle)z",
    ),
    (
        "match: (a|a)*(a|aa)*(a+)+b (exponential for a backtracker)",
        "s=match.^(a|a)*(a|aa)*(a+)+b$",
    ),
    (
        "match: .*.*.*=.* (cubic for a backtracker)",
        "s=match..*.*.*=.*x",
    ),
];

fn change(value: &str) -> Change {
    let table = Table {
        relation_id: 1,
        schema: "public".into(),
        name: "t".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![Column {
            name: "s".into(),
            type_name: "text".into(),
            type_oid: 25,
            is_key: false,
        }]
        .into(),
    };
    Change {
        table: Arc::new(table),
        kind: ChangeKind::Insert,
        commit_lsn: Lsn(1),
        index_in_txn: 0,
        xid: 1,
        commit_time_us: 0,
        record: Some(vec![Value::Present {
            text: value.into(),
            json: "null".into(),
        }]),
        old_record: None,
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let types = TypeRegistry::new();
    let columns = [ColumnInfo {
        name: "s".into(),
        type_oid: 25,
    }];
    println!("| filter | compile (µs) | value bytes | matches/s | MB/s | matched |");
    println!("|---|---:|---:|---:|---:|---|");
    for (label, text) in CASES {
        let parsed = filter::parse(text).with_context(|| format!("parse {text}"))?;
        let started = Instant::now();
        let compiled = parsed
            .compile(&columns, &types)
            .with_context(|| format!("compile {text}"))?;
        let compile_us = started.elapsed().as_secs_f64() * 1e6;
        // Printed in a Markdown table: escape the pipes of the labels.
        let label = label.replace('|', "\\|");
        for &size in &args.value_bytes {
            // The worst input for the backtracking-hostile patterns: all `a`, no final `b`.
            let value = "a".repeat(size);
            let c = change(&value);
            let budget = Duration::from_millis(args.millis);
            let started = Instant::now();
            let mut n: u64 = 0;
            let mut hit = false;
            while started.elapsed() < budget {
                hit = compiled.matches(&c);
                n += 1;
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "| {label} | {compile_us:.0} | {size} | {:.0} | {:.0} | {hit} |",
                n as f64 / secs,
                (n as f64 * size as f64) / secs / 1e6
            );
        }
    }
    Ok(())
}
