//! The scaling report of data-parallel training (`mtkd scaling-report`, run by
//! `cargo xtask bench-dist`): the all-reduce's measured cost per size, one run on one process
//! and one on N ranks with the all-reduce's share of their steps, and a model of N ranks' step
//! time from the measured bandwidth and the gradients' size.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use mtkd_engine::record::{EpochRecord, Summary};
use mtkd_engine::Config;

/// One line of the `allreduce` example's output.
#[derive(Debug, Deserialize)]
struct AllReduce {
    ranks: usize,
    backend: String,
    bytes: u64,
    seconds: f64,
    bus_bytes_per_second: Option<f64>,
}

/// What the report reads of a run folder.
struct Run {
    ranks: usize,
    steps_per_epoch: usize,
    /// Mean over the epochs.
    epoch_seconds: f64,
    allreduce_seconds: f64,
    images: usize,
    final_top: f64,
    metric: String,
    /// Bytes of the student's and adapters' parameters (what is all-reduced).
    grad_bytes: u64,
}

fn read_run(dir: &Path) -> Result<Run> {
    let cfg = Config::load(&dir.join("config.toml"), &[])?;
    let text = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .with_context(|| format!("reading {}", dir.join("metrics.jsonl").display()))?;
    let epochs: Vec<EpochRecord> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("parsing {}", dir.join("metrics.jsonl").display()))?;
    if epochs.is_empty() {
        bail!("{} has no finished epoch", dir.display());
    }
    let summary: Summary = serde_json::from_str(
        &std::fs::read_to_string(dir.join("summary.json"))
            .with_context(|| format!("reading {}", dir.join("summary.json").display()))?,
    )?;
    let ranks = epochs[0].data_parallel.as_ref().map_or(1, |d| d.ranks);
    let n = epochs.len() as f64;
    let (tensors, _) = mtkd_engine::checkpoint::load_latest(&dir.join("checkpoints"))?
        .with_context(|| format!("{} has no checkpoint", dir.display()))?;
    let grad_bytes: u64 = tensors
        .iter()
        .filter(|(name, t)| {
            (name.starts_with("student.") || name.starts_with("adapter."))
                && !name.contains("running_")
                && t.is_floating_point()
        })
        .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
        .sum();
    let images = cfg.data.train_subset;
    if images == 0 {
        bail!(
            "{}: the report needs data.train_subset set, to count the steps",
            dir.display()
        );
    }
    Ok(Run {
        ranks,
        steps_per_epoch: images.div_ceil(cfg.train.batch_size),
        epoch_seconds: epochs.iter().map(|e| e.seconds).sum::<f64>() / n,
        allreduce_seconds: epochs
            .iter()
            .map(|e| {
                e.data_parallel
                    .as_ref()
                    .map_or(0.0, |d| d.allreduce_seconds)
            })
            .sum::<f64>()
            / n,
        images,
        final_top: summary.final_value,
        metric: summary.metric,
        grad_bytes,
    })
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Write the report to `out` from the `allreduce` example's output (`allreduce`, JSON lines),
/// a one-process run folder and a data-parallel one, printing `command` as the way to
/// reproduce it.
pub fn write_report(
    allreduce: &Path,
    one: &Path,
    many: &Path,
    command: &str,
    out: &Path,
) -> Result<()> {
    let lines: Vec<AllReduce> = std::fs::read_to_string(allreduce)
        .with_context(|| format!("reading {}", allreduce.display()))?
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("parsing {}", allreduce.display()))?;
    if lines.is_empty() {
        bail!("{} holds no measurement", allreduce.display());
    }
    let (a, b) = (read_run(one)?, read_run(many)?);
    if a.ranks != 1 || b.ranks < 2 {
        bail!(
            "give a one-process run and a data-parallel run (got {} and {} ranks)",
            a.ranks,
            b.ranks
        );
    }
    let r = lines[0].ranks as f64;
    // Latency: the smallest message's time, less its transfer; bandwidth: the largest one's.
    let largest = lines.iter().max_by_key(|l| l.bytes).unwrap_or(&lines[0]);
    let bus = largest.bus_bytes_per_second.unwrap_or(f64::INFINITY);
    let smallest = lines.iter().min_by_key(|l| l.bytes).unwrap_or(&lines[0]);
    let alpha = (smallest.seconds - 2.0 * (r - 1.0) / r * smallest.bytes as f64 / bus).max(0.0)
        / (2.0 * (r - 1.0)).max(1.0);
    let t_ar = |n: f64, bytes: f64| {
        if n <= 1.0 {
            0.0
        } else {
            2.0 * (n - 1.0) * alpha + 2.0 * (n - 1.0) / n * bytes / bus
        }
    };
    let step1 = a.epoch_seconds / a.steps_per_epoch as f64;
    let stepn = b.epoch_seconds / b.steps_per_epoch as f64;
    let ar_step = b.allreduce_seconds / b.steps_per_epoch as f64;
    let g = a.grad_bytes as f64;

    let mut md = String::new();
    writeln!(md, "# Data-parallel scaling\n")?;
    writeln!(
        md,
        "Written by `{command}` on {} ({} cores), {}, {}, mtkd {}. Figures are one run each \
         on a machine whose ranks share its cores: read them as this machine's, not as a \
         cluster's.\n",
        mtkd_engine::trainer::bench::cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        command_line("mpirun", &["--version"]),
        lines[0].backend,
        env!("CARGO_PKG_VERSION"),
    )?;
    writeln!(md, "## The all-reduce on {} ranks\n", lines[0].ranks)?;
    writeln!(
        md,
        "`all_reduce_grads` of f32 gradients (8 tensors, copies in and out of host vectors \
         included), the median of the repeats of the slowest rank (`crates/dist/examples/allreduce.rs`).\n"
    )?;
    writeln!(md, "| bytes | seconds per call | bus bandwidth (GB/s) |")?;
    writeln!(md, "|---:|---:|---:|")?;
    for l in &lines {
        writeln!(
            md,
            "| {} | {:.6} | {} |",
            l.bytes,
            l.seconds,
            l.bus_bytes_per_second
                .map_or("–".into(), |b| format!("{:.2}", b / 1e9))
        )?;
    }
    writeln!(
        md,
        "\nFitted: latency α = {:.1} µs per ring step, bus bandwidth B = {:.2} GB/s (the largest \
         size). A ring all-reduce of G bytes on N ranks then takes 2(N−1)α + 2(N−1)/N · G/B.\n",
        alpha * 1e6,
        bus / 1e9
    )?;
    writeln!(md, "## One process against {} ranks\n", b.ranks)?;
    writeln!(
        md,
        "The same config, {} training images, {} steps per epoch of the global batch; epoch \
         seconds include the evaluation, which every rank runs whole. Gradients all-reduced: \
         {:.2} MB (the student's and the adapters' parameters). The all-reduce time is rank \
         0's time inside the step's collectives, so it includes waiting for the slower rank \
         and the finite-loss agreement.\n",
        a.images,
        a.steps_per_epoch,
        g / 1e6
    )?;
    writeln!(
        md,
        "| ranks | epoch seconds | images/s | seconds per step | all-reduce per step (s) | all-reduce share | final {} |",
        mtkd_vision_tasks::task::metric_label(&a.metric)
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|")?;
    for (run, ar) in [(&a, 0.0), (&b, ar_step)] {
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.4} | {:.5} | {:.1}% | {:.2} |",
            run.ranks,
            run.epoch_seconds,
            run.images as f64 / run.epoch_seconds,
            run.epoch_seconds / run.steps_per_epoch as f64,
            ar,
            100.0 * ar * run.steps_per_epoch as f64 / run.epoch_seconds,
            run.final_top
        )?;
    }
    let predicted = step1 / b.ranks as f64 + t_ar(b.ranks as f64, g);
    writeln!(
        md,
        "\nMeasured speed-up on {} ranks: {:.2}x. The model below predicts {:.4} s per step for \
         {} ranks against the measured {:.4} s: what it leaves out is the strategy replicated \
         on the global batch, the evaluation run whole by every rank, and, on this machine, the \
         ranks sharing {} cores.\n",
        b.ranks,
        step1 / stepn,
        predicted,
        b.ranks,
        stepn,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )?;
    writeln!(md, "## Model of N ranks\n")?;
    writeln!(
        md,
        "Step time t(N) = t(1)/N + 2(N−1)α + 2(N−1)/N · G/B with t(1) = {:.4} s (measured, one \
         process), G = {:.2} MB and this machine's α and B: each rank on its own cores with the \
         measured loopback transport. Inter-node networks have their own α and B; measure \
         them with the example.\n",
        step1,
        g / 1e6
    )?;
    writeln!(
        md,
        "| N | compute per step (s) | all-reduce per step (s) | step (s) | speed-up | all-reduce share |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|")?;
    for n in [1.0f64, 2.0, 4.0, 8.0, 16.0, 64.0] {
        let c = step1 / n;
        let ar = t_ar(n, g);
        writeln!(
            md,
            "| {n} | {c:.5} | {ar:.6} | {:.5} | {:.2}x | {:.1}% |",
            c + ar,
            step1 / (c + ar),
            100.0 * ar / (c + ar)
        )?;
    }
    mtkd_engine::fsio::write_atomic(out, md.as_bytes())?;
    Ok(())
}
