//! `meshctl trace`: the last traces `meshctl up` received, each as a tree of spans with the
//! process that made it and how long it took, e.g.
//!
//! ```text
//! trace 4bf92f3577b34da6a3ce929d0e0e4736  OrderService/CreateOrder  38.2 ms  (9 spans)
//! └─ OrderService/CreateOrder  orders server 38.2 ms
//!    ├─ saga.check_user  orders 6.1 ms
//!    │  └─ UserService/GetUser  orders client 5.8 ms
//!    │     └─ UserService/GetUser  users-2 server 2.2 ms
//!    │        └─ SELECT users  users-2 0.4 ms
//!    └─ saga.charge  orders 12.0 ms  error: insufficient funds
//! ```

use std::{
    collections::{HashMap, HashSet},
    fmt::Write,
    path::PathBuf,
};

use crate::collector::{StoredSpan, StoredTrace};

/// How many traces are shown when not told otherwise.
const DEFAULT_LAST: usize = 5;

#[derive(clap::Args)]
pub struct TraceArgs {
    /// How many of the most recent traces to show.
    #[arg(long, default_value_t = DEFAULT_LAST)]
    last: usize,
    /// Where `meshctl up` keeps its data (the same as its --data-dir).
    #[arg(long, default_value = crate::up::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
}

pub fn run(args: TraceArgs) -> anyhow::Result<()> {
    let mut traces = crate::collector::load(&args.data_dir)?;
    if traces.is_empty() {
        println!("No traces yet: make a call to the mesh (e.g. `meshctl order ...`).");
        return Ok(());
    }
    traces.sort_by_key(started);
    let skip = traces.len().saturating_sub(args.last);
    for trace in &traces[skip..] {
        print!("{}", render(trace));
        println!();
    }
    Ok(())
}

fn started(trace: &StoredTrace) -> u64 {
    trace
        .spans
        .iter()
        .map(|s| s.start_unix_nano)
        .min()
        .unwrap_or(0)
}

/// One trace as an indented tree, children in the order they started. A span whose parent has
/// not arrived (yet) is shown as a root of its own.
fn render(trace: &StoredTrace) -> String {
    let ids: HashSet<&str> = trace.spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&StoredSpan>> = HashMap::new();
    let mut roots = Vec::new();
    for span in &trace.spans {
        if span.parent_span_id.is_empty() || !ids.contains(span.parent_span_id.as_str()) {
            roots.push(span);
        } else {
            children
                .entry(span.parent_span_id.as_str())
                .or_default()
                .push(span);
        }
    }
    roots.sort_by_key(|s| s.start_unix_nano);
    for siblings in children.values_mut() {
        siblings.sort_by_key(|s| s.start_unix_nano);
    }
    let mut out = String::new();
    let headline = roots
        .first()
        .map(|root| format!("  {}  {}", display_name(&root.name), duration(root)))
        .unwrap_or_default();
    let spans = match trace.spans.len() {
        1 => "1 span".to_owned(),
        n => format!("{n} spans"),
    };
    let _ = writeln!(out, "trace {}{headline}  ({spans})", trace.trace_id);
    let count = roots.len();
    for (i, root) in roots.into_iter().enumerate() {
        let orphan = !root.parent_span_id.is_empty();
        write_span(&mut out, root, &children, "", i + 1 == count, orphan);
    }
    out
}

fn write_span(
    out: &mut String,
    span: &StoredSpan,
    children: &HashMap<&str, Vec<&StoredSpan>>,
    prefix: &str,
    last: bool,
    orphan: bool,
) {
    let (branch, continuation) = if last {
        ("└─ ", "   ")
    } else {
        ("├─ ", "│  ")
    };
    let process = span.instance.as_deref().unwrap_or(&span.service);
    let kind = match span.kind.as_str() {
        "internal" => String::new(),
        kind => format!(" {kind}"),
    };
    let orphan = if orphan {
        "  (parent not received)"
    } else {
        ""
    };
    let error = span
        .error
        .as_deref()
        .map(|message| format!("  error: {message}"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "{prefix}{branch}{}  {process}{kind} {}{error}{orphan}",
        display_name(&span.name),
        duration(span),
    );
    let next = format!("{prefix}{continuation}");
    if let Some(kids) = children.get(span.span_id.as_str()) {
        for (i, kid) in kids.iter().enumerate() {
            write_span(out, kid, children, &next, i + 1 == kids.len(), false);
        }
    }
}

/// `meshwork.users.v1.UserService/GetUser` reads as `UserService/GetUser`; other names as
/// they are.
fn display_name(name: &str) -> &str {
    match name.split_once('/') {
        Some((service, _)) => match service.rfind('.') {
            Some(dot) => &name[dot + 1..],
            None => name,
        },
        None => name,
    }
}

fn duration(span: &StoredSpan) -> String {
    let nanos = span.end_unix_nano.saturating_sub(span.start_unix_nano);
    // Display only: what f64 loses of a nanosecond count is far below what is printed.
    let millis = nanos as f64 / 1e6;
    if millis >= 1000.0 {
        format!("{:.2} s", millis / 1000.0)
    } else if millis >= 10.0 {
        format!("{millis:.1} ms")
    } else {
        format!("{millis:.2} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: &str, parent: &str, service: &str, name: &str, start: u64, end: u64) -> StoredSpan {
        StoredSpan {
            span_id: id.to_owned(),
            parent_span_id: parent.to_owned(),
            service: service.to_owned(),
            instance: None,
            name: name.to_owned(),
            kind: "internal".to_owned(),
            start_unix_nano: start,
            end_unix_nano: end,
            error: None,
        }
    }

    #[test]
    fn a_trace_prints_as_a_tree_in_start_order() {
        let mut charge = span(
            "c",
            "a",
            "billing",
            "meshwork.billing.v1.BillingService/Charge",
            30_000_000,
            40_000_000,
        );
        charge.kind = "server".to_owned();
        charge.error = Some("insufficient funds".to_owned());
        let mut get_user = span(
            "b",
            "a",
            "users",
            "meshwork.users.v1.UserService/GetUser",
            10_000_000,
            15_000_000,
        );
        get_user.instance = Some("users-2".to_owned());
        let trace = StoredTrace {
            trace_id: "t1".to_owned(),
            spans: vec![
                charge,
                span("d", "b", "users", "SELECT users", 11_000_000, 11_500_000),
                span(
                    "a",
                    "",
                    "orders",
                    "meshwork.orders.v1.OrderService/CreateOrder",
                    0,
                    42_000_000,
                ),
                get_user,
            ],
        };
        let expected = "\
trace t1  OrderService/CreateOrder  42.0 ms  (4 spans)
└─ OrderService/CreateOrder  orders 42.0 ms
   ├─ UserService/GetUser  users-2 5.00 ms
   │  └─ SELECT users  users 0.50 ms
   └─ BillingService/Charge  billing server 10.0 ms  error: insufficient funds
";
        assert_eq!(render(&trace), expected);
    }

    #[test]
    fn a_span_whose_parent_is_missing_is_shown_as_a_root() {
        let trace = StoredTrace {
            trace_id: "t2".to_owned(),
            spans: vec![span(
                "b",
                "gone",
                "users",
                "UserService/GetUser",
                0,
                1_000_000,
            )],
        };
        assert!(render(&trace).contains("(parent not received)"));
    }
}
