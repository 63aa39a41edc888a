//! `multivaed bench suite`: every benchmark in one run — ingest and latency against a real broker
//! (`bench stream`), training step and scoring (`bench model`), training epochs on MovieLens-100K
//! and Gowalla next to the PyTorch reference in the same sitting — each in a process of its own
//! so its peak RSS is its own. Writes `report.json` and `report.md` to the output directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::stream::{run_stream_bench, StreamBenchOptions, StreamFigures};

/// Options of `multivaed bench suite`.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    pub brokers: Option<String>,
    pub out: PathBuf,
    pub threads: usize,
    pub ml100k_split: Option<PathBuf>,
    pub gowalla: Option<PathBuf>,
    /// Python with PyTorch, and the reference's paper_protocol.py.
    pub python: Option<PathBuf>,
    pub reference: Option<PathBuf>,
    pub quick: bool,
}

/// One training comparison.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingRow {
    pub data: String,
    pub epochs: usize,
    pub multivaed_seconds_per_epoch: f64,
    pub multivaed_test_ndcg100: f64,
    pub multivaed_peak_rss_bytes: u64,
    pub pytorch_seconds_per_epoch: Option<f64>,
    pub pytorch_test_ndcg100: Option<f64>,
    pub pytorch_peak_rss_bytes: Option<u64>,
    /// multivaed / PyTorch time per epoch: the figure (lower is better).
    pub ratio: Option<f64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    pub machine: Value,
    pub started: String,
    pub seconds: f64,
    pub stream: Option<StreamFigures>,
    /// Live quality on time-ordered MovieLens-100K (`bench live`).
    pub live: Option<super::live::LiveFigures>,
    pub model: Vec<Value>,
    pub training: Vec<TrainingRow>,
    pub skipped: Vec<String>,
}

fn machine(threads: usize) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0);
    json!({
        "cpu": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "threads_used": threads,
        "memory_gib": (mem as f64 / 1048576.0 * 10.0).round() / 10.0,
        "os": std::env::consts::OS,
        "multivaed": env!("CARGO_PKG_VERSION"),
    })
}

/// This benchmark binary (the suite runs each of its parts in a process of its own).
fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("cannot find this executable")
}

/// The `multivaed` binary beside it (`eval`, and the daemon the stream benchmark runs).
fn multivaed() -> PathBuf {
    crate::harness::daemon_exe()
}

/// Runs a command, returning its standard output; fails with its standard error's tail.
fn output(cmd: &mut Command, what: &str) -> Result<String> {
    eprintln!("suite: {what}");
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn last_json(stdout: &str) -> Result<Value> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON in the output")?;
    Ok(serde_json::from_str(line)?)
}

/// Our `eval` on a split directory or a raw file: (seconds per epoch, test NDCG@100, peak RSS).
fn our_training(opts: &SuiteOptions, data: &[&str], epochs: usize) -> Result<(f64, f64, u64)> {
    let mut cmd = Command::new(multivaed());
    cmd.arg("eval").args(data).args([
        "--epochs",
        &epochs.to_string(),
        "--threads",
        &opts.threads.to_string(),
        "--json",
    ]);
    let v = last_json(&output(
        &mut cmd,
        &format!("multivaed eval {}", data.join(" ")),
    )?)?;
    eval_figures(&v)
}

/// (seconds per epoch, test NDCG@100, peak RSS) of an `eval --json` report.
fn eval_figures(v: &Value) -> Result<(f64, f64, u64)> {
    let report: multivaed::eval::EvalReport =
        serde_json::from_value(v.clone()).context("not an eval report")?;
    Ok((
        report.multivae.train_seconds_per_epoch,
        report.multivae.test.ndcg100,
        v["peak_rss_bytes"].as_u64().unwrap_or(0),
    ))
}

/// The PyTorch reference on an `.inter` file (its own split, written to `split_dir`).
fn reference_training(
    opts: &SuiteOptions,
    inter: Option<&Path>,
    split_dir: &Path,
    epochs: usize,
) -> Result<(f64, f64, u64)> {
    let (Some(python), Some(reference)) = (&opts.python, &opts.reference) else {
        bail!("no PyTorch reference configured");
    };
    let out = opts.out.join(format!(
        "pytorch-{}.json",
        split_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("run")
    ));
    let mut cmd = Command::new(python);
    cmd.arg(reference.join("paper_protocol.py"))
        .args(["--seeds", "1", "--epochs", &epochs.to_string()])
        .args(["--threads", &opts.threads.to_string()])
        .arg("--out")
        .arg(&out)
        .env("REF_SPLIT_DIR", split_dir);
    if let Some(inter) = inter {
        cmd.env("REF_INTER", inter);
    }
    output(&mut cmd, "the PyTorch reference (paper_protocol.py)")?;
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let s = &v["vae"]["200"]["summary"];
    Ok((
        s["train_s_per_epoch"].as_f64().unwrap_or(f64::NAN),
        s["ndcg100"]["mean"].as_f64().unwrap_or(f64::NAN),
        (v["peak_rss_mb"].as_f64().unwrap_or(0.0) * 1048576.0) as u64,
    ))
}

/// Gowalla's `uid iid iid …` lines as a RecBole-style `.inter` file (rating 5: every check-in
/// counts), so both implementations read the same file through the same protocol.
fn gowalla_inter(lines: &Path, out: &Path) -> Result<()> {
    use std::io::Write;
    let text = std::fs::read_to_string(lines)
        .with_context(|| format!("cannot read {}", lines.display()))?;
    let mut w = std::io::BufWriter::new(std::fs::File::create(out)?);
    writeln!(
        w,
        "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    )?;
    for line in text.lines() {
        let mut ids = line.split_whitespace();
        let Some(user) = ids.next() else { continue };
        for item in ids {
            writeln!(w, "{user}\t{item}\t5\t0")?;
        }
    }
    w.flush()?;
    Ok(())
}

fn training_row(
    opts: &SuiteOptions,
    name: &str,
    ours: &[&str],
    inter: Option<&Path>,
    split_dir: &Path,
    epochs: usize,
    skipped: &mut Vec<String>,
) -> Result<TrainingRow> {
    let (s, ndcg, rss) = our_training(opts, ours, epochs)?;
    let theirs = match reference_training(opts, inter, split_dir, epochs) {
        Ok(t) => Some(t),
        Err(e) => {
            skipped.push(format!("PyTorch on {name}: {e:#}"));
            None
        }
    };
    Ok(TrainingRow {
        data: name.into(),
        epochs,
        multivaed_seconds_per_epoch: s,
        multivaed_test_ndcg100: ndcg,
        multivaed_peak_rss_bytes: rss,
        pytorch_seconds_per_epoch: theirs.map(|t| t.0),
        pytorch_test_ndcg100: theirs.map(|t| t.1),
        pytorch_peak_rss_bytes: theirs.map(|t| t.2),
        ratio: theirs.map(|t| s / t.0),
    })
}

/// Live quality (`bench live` in a process of its own): one run of role `all` and one of a
/// fleet (`--quick`: role `all`, 1,000 measured clicks), beside the baselines.
fn live_quality(
    opts: &SuiteOptions,
    skipped: &mut Vec<String>,
) -> Result<Option<super::live::LiveFigures>> {
    let data = opts
        .reference
        .as_ref()
        .map(|r| r.join("../data/ml-100k/ml-100k.inter"))
        .filter(|p| p.exists());
    let (Some(brokers), Some(data)) = (opts.brokers.as_ref().filter(|b| !b.is_empty()), data)
    else {
        skipped.push("live quality: needs --brokers and ../shared/data/ml-100k".into());
        return Ok(None);
    };
    let json = opts.out.join("live.json");
    let mut cmd = Command::new(exe()?);
    cmd.args(["live", "--brokers", brokers, "--runs", "1"])
        .arg("--data")
        .arg(&data)
        .args(["--reference-epochs", "20,100"])
        .args(if opts.quick {
            ["--roles", "all", "--clicks", "1000"]
        } else {
            ["--roles", "all,fleet", "--clicks", "3000"]
        })
        .arg("--work-dir")
        .arg(opts.out.join("work"))
        .arg("--json")
        .arg(&json);
    output(&mut cmd, "multivaed bench live")?;
    Ok(Some(serde_json::from_str(&std::fs::read_to_string(
        &json,
    )?)?))
}

/// Runs the suite; writes report.json and report.md under `opts.out` and returns the markdown.
pub fn run_suite(opts: &SuiteOptions) -> Result<String> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let t0 = Instant::now();
    let started = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut skipped = Vec::new();

    let stream = match &opts.brokers {
        Some(b) if !b.is_empty() => {
            let s = run_stream_bench(&StreamBenchOptions {
                brokers: b.clone(),
                ingest_events: if opts.quick { 50_000 } else { 300_000 },
                items: 20_000,
                rates: vec![1000.0, 5000.0],
                seconds: if opts.quick { 15.0 } else { 40.0 },
                exe: multivaed(),
                work_dir: opts.out.join("work"),
            })?;
            Some(s)
        }
        _ => {
            skipped.push("ingest and latency: no --brokers (KAFKA_BROKERS)".into());
            None
        }
    };

    let live = live_quality(opts, &mut skipped)?;

    let mut model = Vec::new();
    for items in [20_000usize, 100_000] {
        let json_path = opts.out.join(format!("model-{items}.json"));
        let mut cmd = Command::new(exe()?);
        cmd.args(["model", "--dense-at", "0", "--steps", "5"])
            .args([
                "--items",
                &items.to_string(),
                "--threads",
                &opts.threads.to_string(),
            ])
            .arg("--json")
            .arg(&json_path);
        output(&mut cmd, &format!("multivaed bench model --items {items}"))?;
        let rows: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&json_path)?)?;
        model.extend(rows);
    }

    let mut training = Vec::new();
    let work = opts.out.join("work");
    std::fs::create_dir_all(&work)?;
    match &opts.ml100k_split {
        Some(split) if split.join("train.csv").exists() => {
            let epochs = if opts.quick { 10 } else { 30 };
            let split_arg = split.display().to_string();
            // the reference rewrites its split directory (the same split: fixed seed)
            let inter = opts.reference.as_ref().map(|r| {
                r.join("..")
                    .join("data")
                    .join("ml-100k")
                    .join("ml-100k.inter")
            });
            training.push(training_row(
                opts,
                "MovieLens-100K (reference split)",
                &["--split", &split_arg],
                inter.as_deref().filter(|p| p.exists()),
                &work.join("ml-100k-split"),
                epochs,
                &mut skipped,
            )?);
        }
        _ => skipped.push("MovieLens-100K: no --ml100k-split".into()),
    }
    match &opts.gowalla {
        Some(g) if g.exists() && !opts.quick => {
            let inter = work.join("gowalla.inter");
            gowalla_inter(g, &inter)?;
            let inter_arg = inter.display().to_string();
            training.push(training_row(
                opts,
                "Gowalla (train.txt, 100 + 100 held-out users)",
                &["--data", &inter_arg, "--heldout-users", "100"],
                Some(&inter),
                &work.join("gowalla-split"),
                1,
                &mut skipped,
            )?);
        }
        Some(_) if opts.quick => skipped.push("Gowalla: --quick".into()),
        _ => skipped.push("Gowalla: no --gowalla".into()),
    }

    let report = SuiteReport {
        machine: machine(opts.threads),
        started,
        seconds: t0.elapsed().as_secs_f64(),
        stream,
        live,
        model,
        training,
        skipped,
    };
    std::fs::write(
        opts.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = markdown(&report);
    std::fs::write(opts.out.join("report.md"), &md)?;
    Ok(md)
}

fn mib(b: u64) -> String {
    if b == 0 {
        "–".into()
    } else {
        format!("{:.0} MiB", b as f64 / 1048576.0)
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

/// The report as markdown tables.
pub fn markdown(r: &SuiteReport) -> String {
    let m = &r.machine;
    let mut s = format!(
        "Machine: {} ({} cores, {} GiB), {} threads; started {}, {:.0} s in all.\n\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_gib"],
        m["threads_used"],
        r.started,
        r.seconds
    );
    if let Some(st) = &r.stream {
        let i = &st.ingest;
        s += "| ingest | events | raw rdkafka consume (events/s) | multivaed into sled (events/s) | ratio | daemon peak RSS |\n|---|---:|---:|---:|---:|---:|\n";
        s += &format!(
            "| {} partitions | {} | {:.0} | {:.0} | **{:.2}** | {} |\n\n",
            i.partitions,
            i.events,
            i.raw_consume_events_per_second,
            i.daemon_events_per_second,
            i.ratio,
            mib(i.daemon_peak_rss_bytes)
        );
        s += "| click → recommendation | training | model items | clicks (answered) | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) | in the daemon p50 / p99 (ms) | clicks' transit p50 / p99 (ms) | re-scorings (p99 ms) | daemon peak RSS |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for l in &st.latency {
            s += &format!(
                "| {:.0} clicks/s | {} ({} rounds) | {} | {} ({}) | {:.1} | {:.1} | **{:.1}** | {:.1} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} ({:.0}) | {} |\n",
                l.rate,
                l.training,
                l.training_rounds_during,
                l.model_items,
                l.clicks,
                l.answered,
                l.p50_ms,
                l.p90_ms,
                l.p99_ms,
                l.max_ms,
                l.daemon_p50_ms,
                l.daemon_p99_ms,
                l.transit_p50_ms,
                l.transit_p99_ms,
                l.rescorings,
                l.rescore_p99_ms,
                mib(l.daemon_peak_rss_bytes)
            );
        }
        s += "\n";
    }
    if let Some(live) = &r.live {
        s += &super::live::live_table(live);
        s += "\n";
    }
    if !r.model.is_empty() {
        s += "| model | items | training step (s) | top-100 users/s | 1-user fold-in (ms) | peak RSS |\n|---|---:|---:|---:|---:|---:|\n";
        for row in &r.model {
            s += &format!(
                "| {} | {} | {:.3} | {:.0} | {:.2} | {} |\n",
                row["device"].as_str().unwrap_or("?"),
                row["items"],
                row["step_seconds"].as_f64().unwrap_or(f64::NAN),
                row["users_per_second"].as_f64().unwrap_or(f64::NAN),
                row["single_user_ms"].as_f64().unwrap_or(f64::NAN),
                mib(row["peak_rss_bytes"].as_u64().unwrap_or(0))
            );
        }
        s += "\n";
    }
    if !r.training.is_empty() {
        s += "| training | epochs | multivaed s/epoch | PyTorch s/epoch | ratio | test NDCG@100 (multivaed / PyTorch) | peak RSS (multivaed / PyTorch) |\n|---|---:|---:|---:|---:|---:|---:|\n";
        for t in &r.training {
            s += &format!(
                "| {} | {} | {:.3} | {} | **{}** | {:.4} / {} | {} / {} |\n",
                t.data,
                t.epochs,
                t.multivaed_seconds_per_epoch,
                opt(t.pytorch_seconds_per_epoch, 3),
                opt(t.ratio, 3),
                t.multivaed_test_ndcg100,
                opt(t.pytorch_test_ndcg100, 4),
                mib(t.multivaed_peak_rss_bytes),
                mib(t.pytorch_peak_rss_bytes.unwrap_or(0))
            );
        }
        s += "\n";
    }
    for k in &r.skipped {
        s += &format!("- skipped: {k}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use multivaed::eval::{BaselineFigures, EvalReport, UserCounts, VaeFigures};

    #[test]
    fn an_eval_report_gives_its_epoch_time_ndcg_and_rss() {
        let figures = |ndcg100| BaselineFigures {
            ndcg100,
            recall20: 0.1,
            recall50: 0.2,
        };
        let report = EvalReport {
            multivae: VaeFigures {
                test: figures(0.4321),
                ndcg100_se: 0.01,
                best_epoch: 3,
                train_seconds_per_epoch: 1.5,
            },
            popularity: figures(0.25),
            users: UserCounts { train: 10, test: 2 },
            items: 7,
            scoring: None,
        };
        // as `eval --json` prints it: the report plus the peak RSS
        let mut v = serde_json::to_value(&report).unwrap();
        v["peak_rss_bytes"] = 1234.into();
        assert_eq!(eval_figures(&v).unwrap(), (1.5, 0.4321, 1234));
        assert!(eval_figures(&serde_json::json!({"multivae": {}})).is_err());
    }
}
