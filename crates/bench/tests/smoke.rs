//! `meshwork-bench run` end to end, briefly: the servers start as separate pinned processes,
//! the load runs every phase, and the report is written with every phase measured and no call
//! failed. (The numbers of a debug build on a busy CI machine mean nothing; `make bench` is
//! where they are measured.)

use std::process::Command;

#[test]
fn a_short_run_measures_every_phase_and_writes_the_report() -> Result<(), Box<dyn std::error::Error>>
{
    let work = tempfile::tempdir()?;
    let out = work.path().join("results");
    let status = Command::new(env!("CARGO_BIN_EXE_meshwork-bench"))
        .args([
            "run",
            "--synthetic-only",
            "--only",
            "1-bare",
            "--only",
            "2-bare-mtls",
        ])
        .args([
            "--warmup",
            "0.2",
            "--duration",
            "0.5",
            "--sequential",
            "0.3",
        ])
        .args(["--concurrency", "8", "--connections", "2"])
        .arg("--out")
        .arg(&out)
        .arg("--work-dir")
        .arg(work.path().join("tmp"))
        .status()?;
    assert!(status.success(), "meshwork-bench run failed: {status}");

    let reports: Vec<_> = std::fs::read_dir(&out)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .collect();
    let json = reports
        .iter()
        .find(|path| path.extension().is_some_and(|ext| ext == "json"))
        .ok_or("no JSON report")?;
    assert!(
        reports
            .iter()
            .any(|path| path.extension().is_some_and(|ext| ext == "md")),
        "no Markdown report in {reports:?}"
    );
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
    let rows = report["rows"].as_array().ok_or("no rows")?;
    let ids: Vec<&str> = rows.iter().filter_map(|row| row["id"].as_str()).collect();
    assert_eq!(ids, ["1-bare", "2-bare-mtls"]);
    for row in rows {
        let phases = std::iter::once(&row["sequential"])
            .chain(std::iter::once(&row["max"]))
            .chain(row["rates"].as_array().ok_or("no rates")?.iter());
        let mut count = 0;
        for phase in phases {
            count += 1;
            let calls = phase["summary"]["calls"].as_u64().ok_or("no calls")?;
            assert!(calls > 0, "{}: a phase made no call: {phase}", row["id"]);
            assert_eq!(phase["summary"]["errors"].as_u64(), Some(0), "{phase}");
            assert!(
                phase["server_cpu_pct"]
                    .as_f64()
                    .is_some_and(|cpu| cpu > 0.0)
            );
        }
        assert_eq!(count, 5, "1 at a time, max, 25%, 50%, 75%");
        let memory = row["processes"][0]["idle_rss_mib"]
            .as_f64()
            .ok_or("no memory")?;
        assert!(memory > 1.0, "{memory} MiB");
    }
    Ok(())
}
