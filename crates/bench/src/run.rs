//! `meshwork-bench run` (what `make bench` runs): every configuration in one run, on this
//! machine, servers on one CPU and the load on the other; then the goals checked and the report
//! written. See the crate documentation for the configurations.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context;
use mesh::tls::{DEFAULT_TRUST_DOMAIN, MeshTls, TlsConfig};

use crate::{
    collector::Collector,
    directory,
    load::{self, Call, Outcome},
    procs::{self, Proc, Spec},
    procstat,
    real::{self, Database, RealMesh, Urls},
    report::{Goal, Machine, Phase, Report, Row, Settings},
    synthetic::{BACKEND_IDENTITY, Shape},
    targets::{self, Security},
};

/// What the chart deploys: traces sampled at 10% (parent-based), exported over OTLP.
const DEFAULT_SAMPLER: &str = "parentbased_traceidratio";
const DEFAULT_SAMPLER_ARG: &str = "0.1";
/// Goals of the issue.
const GOAL_THROUGHPUT_RATIO: f64 = 0.85;
const GOAL_HOP_P50_US: f64 = 200.0;
const GOAL_HOP_P99_US: f64 = 1_000.0;
const GOAL_IDLE_RSS_MIB: f64 = 15.0;
/// Longer than the batch span processor's default delay (5 s), so every exported span is in.
const EXPORT_SETTLE: Duration = Duration::from_secs(6);
/// Rate of the fully traced run that attributes database time.
const ATTRIBUTION_FRACTION: f64 = 0.25;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Seconds of warm-up before each measured phase.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds each phase is measured.
    #[arg(long, default_value_t = 8.0)]
    pub duration: f64,
    /// Seconds of one-call-at-a-time round trips measured first on each configuration.
    #[arg(long, default_value_t = 2.0)]
    pub sequential: f64,
    /// Concurrent calls of the closed loop (synthetic configurations).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Concurrent calls of the closed loop on the real services (each call holds a database
    /// connection; the pools are small).
    #[arg(long, default_value_t = 16)]
    pub real_concurrency: usize,
    /// HTTP/2 connections the load is spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Where the Markdown and JSON results go.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Scratch space: certificates, SQLite files, server logs.
    #[arg(long, default_value = "bench/tmp")]
    pub work_dir: PathBuf,
    /// Where the service binaries are (release builds); defaults to this binary's directory.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// PostgreSQL server to run the real services on (the `postgres` role must be able to
    /// create databases); without it only SQLite is measured.
    #[arg(long, env = "TEST_POSTGRES_URL")]
    pub postgres_url: Option<String>,
    /// Skip the real services (only the five synthetic configurations).
    #[arg(long)]
    pub synthetic_only: bool,
    /// Measure only the configurations whose ids start with this (repeatable: `--only 3-mesh`).
    #[arg(long)]
    pub only: Vec<String>,
}

/// What every measurement needs.
struct Ctx {
    launcher: PathBuf,
    bin_dir: PathBuf,
    certs_dir: PathBuf,
    log_dir: PathBuf,
    server_cpu: usize,
    operator: MeshTls,
    collector: Collector,
    warmup: Duration,
    duration: Duration,
    sequential: Duration,
    fractions: Vec<f64>,
    connections: usize,
    only: Vec<String>,
}

impl Ctx {
    /// Whether the configuration `id` is to be measured in this run.
    fn wants(&self, id: &str) -> bool {
        self.only.is_empty()
            || self
                .only
                .iter()
                .any(|prefix| id.starts_with(prefix.as_str()))
    }
}

/// One configuration to measure.
struct RowSpec {
    id: &'static str,
    title: &'static str,
    baseline: Option<&'static str>,
    call: String,
}

pub async fn run(args: RunArgs, server_cpu: usize, load_cpu: usize) -> anyhow::Result<Report> {
    let started = time::OffsetDateTime::now_utc();
    let stamp = started
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let launcher = std::env::current_exe().context("finding this binary")?;
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => launcher
            .parent()
            .map(Path::to_path_buf)
            .context("this binary has no directory")?,
    };
    let work = args
        .work_dir
        .join(format!("run-{}", started.unix_timestamp()));
    let certs_dir = work.join("certs");
    let log_dir = work.join("logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    mesh::pki::write_dev_pki(
        &certs_dir,
        DEFAULT_TRUST_DOMAIN,
        "default",
        &["users", "billing", "orders", "auth", mesh::pki::OPERATOR],
    )?;
    let operator = MeshTls::load(&TlsConfig::in_dir(&certs_dir, mesh::pki::OPERATOR))?;
    let ctx = Ctx {
        launcher,
        bin_dir,
        certs_dir,
        log_dir,
        server_cpu,
        operator,
        collector: Collector::start()?,
        warmup: Duration::from_secs_f64(args.warmup),
        duration: Duration::from_secs_f64(args.duration),
        sequential: Duration::from_secs_f64(args.sequential),
        fractions: vec![0.25, 0.5, 0.75],
        connections: args.connections,
        only: args.only.clone(),
    };
    println!(
        "meshwork-bench: servers on CPU {server_cpu}, load on CPU {load_cpu}; scratch in {}",
        work.display()
    );

    let mut rows = synthetic_rows(&ctx, args.concurrency).await?;
    if !args.synthetic_only {
        let mut databases = vec![Database::Sqlite(work.join("sqlite"))];
        match &args.postgres_url {
            Some(url) => databases.push(Database::Postgres(url.clone())),
            None => println!("meshwork-bench: TEST_POSTGRES_URL is not set: PostgreSQL is skipped"),
        }
        for database in databases {
            let name = database.name();
            if ctx.wants(&format!("6-users-get-{name}"))
                || ctx.wants(&format!("7-create-order-{name}"))
            {
                rows.extend(real_rows(&ctx, &database, args.real_concurrency).await?);
            }
        }
    }

    let report = Report {
        started: stamp,
        machine: Machine {
            cpu_model: cpu_model(),
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            server_cpu,
            load_cpu,
        },
        settings: Settings {
            warmup_s: args.warmup,
            duration_s: args.duration,
            concurrency: args.concurrency,
            real_concurrency: args.real_concurrency,
            connections: args.connections,
            load_fractions: ctx.fractions.clone(),
        },
        goals: Vec::new(),
        rows,
    };
    Ok(Report {
        goals: goals(&report),
        ..report
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// The environment that makes a mesh process export traces to the sink with `sampler`; the
/// batch processor as the chart leaves it (the SDK's defaults: a queue of 2,048 spans, sent
/// every 5 s or every 512 spans) unless `keep_all`, for the run that must see every span.
fn tracing_env(
    ctx: &Ctx,
    sampler: &str,
    arg: Option<&str>,
    keep_all: bool,
) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            ctx.collector.endpoint(),
        ),
        ("OTEL_TRACES_SAMPLER".to_owned(), sampler.to_owned()),
    ];
    if let Some(arg) = arg {
        env.push(("OTEL_TRACES_SAMPLER_ARG".to_owned(), arg.to_owned()));
    }
    if keep_all {
        // A queue this long costs memory (it is allocated up front): only where memory is not
        // what is measured.
        env.push(("OTEL_BSP_MAX_QUEUE_SIZE".to_owned(), "65536".to_owned()));
        env.push(("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned()));
    }
    env
}

/// Tracing as the chart deploys it.
fn default_tracing(ctx: &Ctx) -> Vec<(String, String)> {
    tracing_env(ctx, DEFAULT_SAMPLER, Some(DEFAULT_SAMPLER_ARG), false)
}

async fn start_synthetic(
    ctx: &Ctx,
    name: &str,
    shape: Shape,
    backends: &[&Proc],
    env: Vec<(String, String)>,
) -> anyhow::Result<Proc> {
    let mut args = vec![
        "serve".to_owned(),
        "--shape".to_owned(),
        clap::ValueEnum::to_possible_value(&shape)
            .map(|value| value.get_name().to_owned())
            .context("every shape has a name")?,
        "--cpu".to_owned(),
        ctx.server_cpu.to_string(),
        "--certs-dir".to_owned(),
        ctx.certs_dir.display().to_string(),
    ];
    for backend in backends {
        args.push("--backend".to_owned());
        args.push(backend.addr.to_string());
    }
    let mut proc = Proc::announcing(Spec {
        name: name.to_owned(),
        program: &ctx.launcher,
        args,
        env,
        log_dir: &ctx.log_dir,
    })
    .await?;
    proc.mark_idle()?;
    Ok(proc)
}

fn synthetic_ids() -> Vec<String> {
    (0..directory::SEEDED_USERS as u64)
        .map(directory::user_id)
        .collect()
}

fn mtls_to(ctx: &Ctx, service: &str) -> Security {
    Security::Mtls {
        tls: ctx.operator.clone(),
        service: service.to_owned(),
    }
}

async fn synthetic_rows(ctx: &Ctx, concurrency: usize) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let get_user = "users.GetUser on the in-memory directory";

    if ctx.wants("1-bare") {
        let bare = start_synthetic(ctx, "bare", Shape::Bare, &[], Vec::new()).await?;
        rows.push(
            row(
                ctx,
                RowSpec {
                    id: "1-bare",
                    title: "bare tonic, plaintext",
                    baseline: None,
                    call: format!("{get_user}: bare tonic server, plaintext"),
                },
                vec![bare],
                Security::Plaintext,
                concurrency,
                false,
            )
            .await?,
        );
    }

    if ctx.wants("2-bare-mtls") {
        let bare_mtls = start_synthetic(ctx, "bare-mtls", Shape::BareMtls, &[], Vec::new()).await?;
        rows.push(
            row(ctx, RowSpec {
                id: "2-bare-mtls",
                title: "bare tonic, mTLS",
                baseline: Some("1-bare"),
                call: format!("{get_user}: bare tonic server over rustls mutual TLS (TLS 1.3, the mesh's certificates)"),
            }, vec![bare_mtls], mtls_to(ctx, BACKEND_IDENTITY), concurrency, false)
            .await?,
        );
    }

    if ctx.wants("3-mesh") {
        let mesh = start_synthetic(ctx, "mesh", Shape::Mesh, &[], default_tracing(ctx)).await?;
        rows.push(
            row(ctx, RowSpec {
                id: "3-mesh",
                title: "mesh server stack",
                baseline: Some("2-bare-mtls"),
                call: format!("{get_user}: the full mesh server stack (mTLS, authorization, tracing with the chart's sampler: parent-based 10%, exported over OTLP, metrics, deadline, concurrency limit)"),
            }, vec![mesh], mtls_to(ctx, BACKEND_IDENTITY), concurrency, true)
            .await?,
        );
    }

    if ctx.wants("3t-mesh-traced") {
        let traced = start_synthetic(
            ctx,
            "mesh-traced",
            Shape::Mesh,
            &[],
            tracing_env(ctx, "always_on", None, false),
        )
        .await?;
        rows.push(
            row(
                ctx,
                RowSpec {
                    id: "3t-mesh-traced",
                    title: "mesh server stack, 100% traced",
                    baseline: Some("2-bare-mtls"),
                    call: format!("{get_user}: the same stack with every call traced and exported"),
                },
                vec![traced],
                mtls_to(ctx, BACKEND_IDENTITY),
                concurrency,
                true,
            )
            .await?,
        );
    }

    if ctx.wants("4-hop-bare") {
        let backend_1 =
            start_synthetic(ctx, "bare-backend-1", Shape::Bare, &[], Vec::new()).await?;
        let backend_2 =
            start_synthetic(ctx, "bare-backend-2", Shape::Bare, &[], Vec::new()).await?;
        let front = start_synthetic(
            ctx,
            "front-bare",
            Shape::FrontBare,
            &[&backend_1, &backend_2],
            Vec::new(),
        )
        .await?;
        rows.push(
            row(ctx, RowSpec {
                id: "4-hop-bare",
                title: "one hop, bare tonic Channel",
                baseline: None,
                call: format!("{get_user} through a plaintext front that calls two bare plaintext replicas through a bare tonic Channel (tonic's balancer)"),
            }, vec![front, backend_1, backend_2], Security::Plaintext, concurrency, false)
            .await?,
        );
    }

    if ctx.wants("5-hop-mesh") {
        let backend_1 = start_synthetic(
            ctx,
            "mesh-backend-1",
            Shape::Mesh,
            &[],
            default_tracing(ctx),
        )
        .await?;
        let backend_2 = start_synthetic(
            ctx,
            "mesh-backend-2",
            Shape::Mesh,
            &[],
            default_tracing(ctx),
        )
        .await?;
        let front = start_synthetic(
            ctx,
            "front-mesh",
            Shape::FrontMesh,
            &[&backend_1, &backend_2],
            default_tracing(ctx),
        )
        .await?;
        rows.push(
            row(ctx, RowSpec {
                id: "5-hop-mesh",
                title: "one hop, mesh client stack",
                baseline: Some("4-hop-bare"),
                call: format!("{get_user} through the same front calling two mesh-server replicas through the mesh client stack (p2c PeakEWMA balancer, ejection, retry budget, deadlines, tracing at 10%, metrics, mutual TLS)"),
            }, vec![front, backend_1, backend_2], Security::Plaintext, concurrency, true)
            .await?,
        );
    }
    Ok(rows)
}

/// Measures one configuration whose first process is the target, then stops its processes.
async fn row(
    ctx: &Ctx,
    spec: RowSpec,
    mut procs: Vec<Proc>,
    security: Security,
    concurrency: usize,
    exports_traces: bool,
) -> anyhow::Result<Row> {
    let target = procs.first().map(|p| p.addr).context("no process")?;
    let channels = targets::channels(target, &security, ctx.connections).await?;
    let call = targets::get_user(channels, synthetic_ids())?;
    let row = measure(ctx, spec, &mut procs, call, concurrency, exports_traces).await;
    for proc in procs {
        proc.stop().await;
    }
    row
}

/// Every phase on one configuration: one call at a time, the closed-loop maximum, then the
/// open loop at each fraction of that maximum.
async fn measure(
    ctx: &Ctx,
    spec: RowSpec,
    procs: &mut [Proc],
    call: Call,
    concurrency: usize,
    exports_traces: bool,
) -> anyhow::Result<Row> {
    println!("meshwork-bench: {} ({})", spec.id, spec.title);
    ctx.collector.reset();
    let mut calls_made = 0u64;
    let (sequential, calls) = phase(
        procs,
        "1 at a time",
        load::sequential(call.clone(), ctx.sequential),
    )
    .await?;
    // The sequential loop's own warm-up call, too.
    calls_made += calls + 1;
    print_phase(&sequential);
    let warm = load::closed(call.clone(), concurrency, Duration::ZERO, ctx.warmup).await?;
    calls_made += warm.calls();
    let (max, calls) = phase(
        procs,
        "max",
        load::closed(call.clone(), concurrency, Duration::ZERO, ctx.duration),
    )
    .await?;
    calls_made += calls;
    print_phase(&max);
    let mut rates = Vec::new();
    for fraction in &ctx.fractions {
        let rate = max.summary.rps * fraction;
        let warm = load::open(call.clone(), rate, Duration::ZERO, ctx.warmup).await?;
        calls_made += warm.calls();
        let label = format!("{:.0}%", fraction * 100.0);
        let (measured, calls) = phase(
            procs,
            &label,
            load::open(call.clone(), rate, Duration::ZERO, ctx.duration),
        )
        .await?;
        calls_made += calls;
        print_phase(&measured);
        rates.push(measured);
    }
    let spans_per_call = if exports_traces {
        // The exporters send every 5 s (or every 512 spans): wait for the last batches.
        tokio::time::sleep(EXPORT_SETTLE).await;
        Some(ctx.collector.spans() as f64 / calls_made.max(1) as f64)
    } else {
        None
    };
    for proc in procs.iter_mut() {
        proc.check_alive()?;
    }
    let processes = procs
        .iter()
        .map(Proc::memory)
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Row {
        id: spec.id.to_owned(),
        title: spec.title.to_owned(),
        baseline: spec.baseline.map(str::to_owned),
        call: spec.call,
        sequential,
        max,
        rates,
        processes,
        spans_per_call,
        db: None,
    })
}

fn print_phase(phase: &Phase) {
    let s = &phase.summary;
    let late = s
        .send_late_p99_us
        .map(|late| format!("  sent late p99 {}", crate::report::micros(late)))
        .unwrap_or_default();
    println!(
        "  {:>11}: {:>8.0} req/s  p50 {:>9}  p99 {:>9}  p99.9 {:>9}  errors {:>5}  server CPU {:>4.0}%  load CPU {:>4.0}%{late}",
        phase.load,
        s.offered_rps.unwrap_or(s.rps),
        crate::report::micros(s.p50_us),
        crate::report::micros(s.p99_us),
        crate::report::micros(s.p999_us),
        s.errors,
        phase.server_cpu_pct,
        phase.load_cpu_pct,
    );
}

/// Runs `load`, measuring the server processes' and this process's CPU over it.
async fn phase(
    procs: &[Proc],
    label: &str,
    load: impl std::future::Future<Output = anyhow::Result<Outcome>>,
) -> anyhow::Result<(Phase, u64)> {
    let server_before = procs::cpu_time(procs)?;
    let self_before = procstat::cpu_time(0)?;
    let started = Instant::now();
    let outcome = load.await?;
    let wall = started.elapsed().as_secs_f64();
    let server = procs::cpu_time(procs)?
        .saturating_sub(server_before)
        .as_secs_f64();
    let own = procstat::cpu_time(0)?
        .saturating_sub(self_before)
        .as_secs_f64();
    let calls = outcome.calls();
    Ok((
        Phase {
            load: label.to_owned(),
            server_cpu_pct: 100.0 * server / wall,
            server_cpu_us_per_call: if calls == 0 {
                0.0
            } else {
                server * 1e6 / calls as f64
            },
            load_cpu_pct: 100.0 * own / wall,
            summary: outcome.summary(),
        },
        calls,
    ))
}

/// users.GetUser and orders.CreateOrder on the real services with their data on `database`.
async fn real_rows(ctx: &Ctx, database: &Database, concurrency: usize) -> anyhow::Result<Vec<Row>> {
    let urls = Urls::prepare(database).await?;
    let measured = real_measure(ctx, &urls, database.name(), concurrency).await;
    let cleaned = urls.drop_databases().await;
    let rows = measured?;
    cleaned?;
    Ok(rows)
}

async fn real_measure(
    ctx: &Ctx,
    urls: &Urls,
    db: &'static str,
    concurrency: usize,
) -> anyhow::Result<Vec<Row>> {
    let deployed = default_tracing(ctx);
    let start = real::Start {
        launcher: &ctx.launcher,
        bin_dir: &ctx.bin_dir,
        certs_dir: &ctx.certs_dir,
        log_dir: &ctx.log_dir,
        cpu: ctx.server_cpu,
        operator: &ctx.operator,
        tracing: &deployed,
        label: format!("-{db}"),
    };
    let mut mesh = start.mesh(urls).await?;
    let users = real::seed(&mesh, &ctx.operator).await?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (get_call, order_call) = real_calls(ctx, &mesh, &users, &run).await?;
    let (get_id, order_id) = match db {
        "sqlite" => ("6-users-get-sqlite", "7-create-order-sqlite"),
        _ => ("6-users-get-postgres", "7-create-order-postgres"),
    };
    // Both calls are measured on the same processes (the memory columns show it).
    let get = measure(
        ctx,
        RowSpec {
            id: get_id,
            title: "users.GetUser from its store",
            baseline: Some("3-mesh"),
            call: format!(
                "users.GetUser on the real users service, its store on {db}, mTLS as the operator, tracing as the chart deploys it (baseline: the same stack over the in-memory directory)"
            ),
        },
        &mut mesh.procs,
        get_call,
        concurrency,
        true,
    )
    .await;
    let order = match &get {
        Ok(_) => {
            measure(
                ctx,
                RowSpec {
                    id: order_id,
                    title: "orders.CreateOrder end to end",
                    baseline: None,
                    call: format!(
                        "orders.CreateOrder on the real services: orders -> users.GetUser, billing.Charge, the order and the payment written in transactions, every store on {db}"
                    ),
                },
                &mut mesh.procs,
                order_call,
                concurrency,
                true,
            )
            .await
        }
        Err(_) => Err(anyhow::anyhow!("skipped after the failure above")),
    };
    for proc in mesh.procs {
        proc.stop().await;
    }
    let (get, order) = (get?, order?);

    // Database time: the same calls on the same data, on services that trace every call.
    let traced = tracing_env(ctx, "always_on", None, true);
    let traced_start = real::Start {
        tracing: &traced,
        label: format!("-{db}-traced"),
        ..start
    };
    let mesh = traced_start.mesh(urls).await?;
    let (get_call, order_call) = real_calls(ctx, &mesh, &users, &format!("{run}-traced")).await?;
    let get_db = attribute(ctx, get_call, get.max.summary.rps * ATTRIBUTION_FRACTION).await;
    let order_db = match &get_db {
        Ok(_) => {
            attribute(
                ctx,
                order_call,
                order.max.summary.rps * ATTRIBUTION_FRACTION,
            )
            .await
        }
        Err(_) => Err(anyhow::anyhow!("skipped after the failure above")),
    };
    for proc in mesh.procs {
        proc.stop().await;
    }
    Ok(vec![
        Row { db: get_db?, ..get },
        Row {
            db: order_db?,
            ..order
        },
    ])
}

async fn real_calls(
    ctx: &Ctx,
    mesh: &RealMesh,
    users: &[String],
    run: &str,
) -> anyhow::Result<(Call, Call)> {
    let users_channels =
        targets::channels(mesh.users, &mtls_to(ctx, "users"), ctx.connections).await?;
    let orders_channels =
        targets::channels(mesh.orders, &mtls_to(ctx, "orders"), ctx.connections).await?;
    Ok((
        targets::get_user(users_channels, users.to_vec())?,
        targets::create_order(orders_channels, users.to_vec(), format!("bench-{run}"))?,
    ))
}

/// Database time of `call`: sent at `rate` for the phase duration to services tracing every
/// call, then read from the spans received.
async fn attribute(
    ctx: &Ctx,
    call: Call,
    rate: f64,
) -> anyhow::Result<Option<crate::collector::DbShare>> {
    let _ = load::open(call.clone(), rate, Duration::ZERO, ctx.warmup).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ctx.collector.reset();
    let _ = load::open(call, rate, Duration::ZERO, ctx.duration).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(ctx.collector.db_share())
}

/// The goals, checked against this run.
fn goals(report: &Report) -> Vec<Goal> {
    let mut goals = Vec::new();
    if let (Some(mesh), Some(tls)) = (report.row("3-mesh"), report.row("2-bare-mtls")) {
        let ratio = mesh.max.summary.rps / tls.max.summary.rps.max(f64::MIN_POSITIVE);
        goals.push(Goal {
            goal: format!(
                "full server stack (3) >= {GOAL_THROUGHPUT_RATIO}x the requests/s of bare tonic mTLS (2)"
            ),
            measured: format!(
                "{:.0} vs {:.0} req/s: {ratio:.2}x",
                mesh.max.summary.rps, tls.max.summary.rps
            ),
            met: ratio >= GOAL_THROUGHPUT_RATIO,
        });
    }
    if let (Some(mesh), Some(bare)) = (report.row("5-hop-mesh"), report.row("4-hop-bare")) {
        let at_half = |row: &Row| row.rates.iter().find(|p| p.load == "50%").cloned();
        if let (Some(m), Some(b)) = (at_half(mesh), at_half(bare)) {
            let p50 = m.summary.p50_us - b.summary.p50_us;
            let p99 = m.summary.p99_us - b.summary.p99_us;
            let behind = if crate::report::fell_behind(&m) || crate::report::fell_behind(&b) {
                " (the load generator fell behind: see †)"
            } else {
                ""
            };
            goals.push(Goal {
                goal: format!(
                    "mesh hop (5) vs bare hop (4) at 50% load: < {GOAL_HOP_P50_US:.0} µs added at p50, < {GOAL_HOP_P99_US:.0} µs at p99"
                ),
                measured: format!(
                    "{p50:+.0} µs at p50 ({:.0} vs {:.0} µs), {p99:+.0} µs at p99 ({:.0} vs {:.0} µs){behind}",
                    m.summary.p50_us, b.summary.p50_us, m.summary.p99_us, b.summary.p99_us
                ),
                met: p50 < GOAL_HOP_P50_US && p99 < GOAL_HOP_P99_US,
            });
        }
    }
    let services: Vec<_> = report
        .rows
        .iter()
        .filter(|row| row.id.starts_with("6-") || row.id.starts_with("7-"))
        .flat_map(|row| row.processes.iter())
        .collect();
    if let Some(worst) = services
        .iter()
        .max_by(|a, b| a.idle_rss_mib.total_cmp(&b.idle_rss_mib))
    {
        let mut seen = std::collections::BTreeMap::new();
        for p in &services {
            seen.entry(p.name.clone()).or_insert(p.idle_rss_mib);
        }
        goals.push(Goal {
            goal: format!("idle resident memory < {GOAL_IDLE_RSS_MIB:.0} MiB per service process"),
            measured: seen
                .iter()
                .map(|(name, mib)| format!("{name} {mib:.1} MiB"))
                .collect::<Vec<_>>()
                .join(", "),
            met: worst.idle_rss_mib < GOAL_IDLE_RSS_MIB,
        });
    }
    goals
}
