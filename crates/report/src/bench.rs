//! The performance report's markdown (`docs/PERF.md`, `mtkd bench-report`): the raw timings of
//! `mtkd bench-steps` and `scripts/bench_eager.py` rounds, tabled per setting with the ratio to
//! eager PyTorch, where the step's time goes, the machine and its measured peak, and
//! criterion's means. It reads JSON files and writes markdown; the timings are taken by the
//! engine (`mtkd_engine::trainer::bench`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

/// A step mode of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchMode {
    /// Cross-entropy only: teachers are not run.
    Ce,
    /// KD from the pool's first teacher only (`single`).
    Kd1,
    /// Equal weights over the pool (AVER).
    Aver,
    /// The MTKD-RL agent, in the mode of the config's `[distill.agent]`.
    MtkdRl,
    /// MTKD-RL from the second epoch on with the teachers' outputs read from the cache
    /// (`distill.output_cache_mb`, `data.augment` off): the teachers are not run.
    MtkdRlCached,
}

impl BenchMode {
    pub const ALL: [BenchMode; 5] = [
        BenchMode::Ce,
        BenchMode::Kd1,
        BenchMode::Aver,
        BenchMode::MtkdRl,
        BenchMode::MtkdRlCached,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Ce => "ce",
            BenchMode::Kd1 => "kd1",
            BenchMode::Aver => "aver",
            BenchMode::MtkdRl => "mtkd-rl",
            BenchMode::MtkdRlCached => "mtkd-rl-cached",
        }
    }

    pub fn parse(s: &str) -> Result<BenchMode> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                anyhow!("unknown step mode `{s}` (ce, kd1, aver, mtkd-rl, mtkd-rl-cached)")
            })
    }
}

/// The convolutions the peak is the best of: batch 64, 3x3, channels in = out, at the widths
/// and sides of a CIFAR ResNet's stages.
pub const PEAK_CONV_SHAPES: [[i64; 4]; 3] =
    [[64, 64, 32, 32], [64, 128, 32, 32], [64, 256, 16, 16]];

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn read_json(p: &Path) -> Result<serde_json::Value> {
    crate::html::read_json(p)
}

/// One mode's figures over the rounds of one implementation.
#[derive(Default, Clone)]
struct ModeFigures {
    ips: Vec<f64>,
    teacher_share: Vec<f64>,
    teacher_step_seconds: Vec<f64>,
    flops: Option<f64>,
    teacher_flops: Option<f64>,
    /// Per round, ms per step: the whole step (the end of the epoch spread over the steps),
    /// teachers, signals, strategy, reward forwards, end of epoch (absent in files of mtkd
    /// before the breakdown).
    parts: Vec<[f64; 6]>,
}

type SettingFigures = std::collections::BTreeMap<String, ModeFigures>;

fn collect(files: &[PathBuf]) -> Result<SettingFigures> {
    let mut out = SettingFigures::new();
    for f in files {
        let v = read_json(f)?;
        for t in v["timings"].as_array().cloned().unwrap_or_default() {
            let mode = t["mode"].as_str().unwrap_or("?").to_owned();
            let e = out.entry(mode).or_default();
            let steps: Vec<f64> = t["step_seconds"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default();
            let total: f64 =
                steps.iter().sum::<f64>() + t["end_epoch_seconds"].as_f64().unwrap_or(0.0);
            let teach = t["teacher_seconds"].as_f64().unwrap_or(0.0);
            e.ips
                .push(t["images_per_second"].as_f64().unwrap_or(f64::NAN));
            if total > 0.0 {
                e.teacher_share.push(teach / total);
            }
            if !steps.is_empty() {
                e.teacher_step_seconds.push(teach / steps.len() as f64);
            }
            if let (Some(sig), Some(strat), Some(rew), false) = (
                t["signal_seconds"].as_f64(),
                t["strategy_seconds"].as_f64(),
                t["reward_seconds"].as_f64(),
                steps.is_empty(),
            ) {
                let per = |x: f64| 1e3 * x / steps.len() as f64;
                e.parts.push([
                    per(total),
                    per(teach),
                    per(sig),
                    per(strat),
                    per(rew),
                    per(t["end_epoch_seconds"].as_f64().unwrap_or(0.0)),
                ]);
            }
            if let Some(x) = t["flops_per_step"].as_f64() {
                e.flops = Some(x);
            }
            if let Some(x) = t["teacher_flops_per_step"].as_f64() {
                e.teacher_flops = Some(x);
            }
        }
    }
    Ok(out)
}

/// Where a step's time goes in mtkd, per mode with a distillation step (from the timings'
/// breakdown; empty when the files have none).
fn breakdown(mf: &SettingFigures) -> String {
    let rows: Vec<(BenchMode, [f64; 6])> = [BenchMode::Kd1, BenchMode::Aver, BenchMode::MtkdRl]
        .into_iter()
        .filter_map(|m| {
            let f = mf.get(m.name())?;
            if f.parts.is_empty() {
                return None;
            }
            let mut med = [0.0; 6];
            for (i, x) in med.iter_mut().enumerate() {
                *x = median(f.parts.iter().map(|p| p[i]).collect());
            }
            Some((m, med))
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut md =
        "\nWhere a step's time goes in mtkd (ms per step, median over the rounds; the end \
                  of the epoch, the published agent's update, spread over the timed steps; the \
                  rest is the student's forward and backward, the losses and the optimizer):\n\n\
                  | mode | step | teachers | signals | strategy (state, policy, feedback) | \
                  reward forwards | end of epoch | the rest |\n|---|---|---|---|---|---|---|---|\n"
            .to_owned();
    for (m, p) in &rows {
        let rest = p[0] - p[1..].iter().sum::<f64>();
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            m.name(),
            p[0],
            p[1],
            p[2],
            p[3],
            p[4],
            p[5],
            rest
        ));
    }
    // The agent's own cost against the reward it is given: the clean and meta rewards are
    // defined on two eval-mode forwards of the student per step (before and after its update).
    let get = |m: BenchMode| rows.iter().find(|(x, _)| *x == m).map(|(_, p)| *p);
    if let (Some(a), Some(r)) = (get(BenchMode::Aver), get(BenchMode::MtkdRl)) {
        if r[4] > 0.0 {
            md.push_str(&format!(
                "\nThe agent's own work (state, policy, feedback, end-of-epoch update) is \
                 {:.1} ms per step; the reward of its mode (clean or meta: the student's \
                 cross-entropy in eval mode before and after its update, two forwards per step \
                 by definition) is {:.1} ms, {:.0}% of the MTKD-RL step. Without those forwards \
                 the step would run at {:.3} of AVER's rate (derived from the medians above, \
                 not timed on its own).\n",
                r[3] + r[5],
                r[4],
                100.0 * r[4] / r[0],
                a[0] / (r[0] - r[4]),
            ));
        }
    }
    md
}

fn spread(v: &[f64]) -> String {
    if v.len() < 2 {
        return format!("{:.1}", median(v.to_vec()));
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.1} ({lo:.1}-{hi:.1})", median(v.to_vec()))
}

/// The CPU's model name (`/proc/cpuinfo`), as the comparison tables print it.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// The current time, `YYYY-MM-DD HH:MM UTC` (the system's `date`; empty when it fails), as the
/// reports print it.
pub fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu_model();
    let flags = cpu
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap_or_default()
        .to_owned();
    let simd: Vec<&str> = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!(
        "{model}, {} logical cores, {mem} memory, SIMD: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        simd.join(" ")
    )
}

/// Criterion's mean estimates under `dir` (`<group>/<bench>[/<param>]/new/estimates.json`).
fn criterion_means(dir: &Path) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    if let Ok(v) = read_json(&p.join("estimates.json")) {
                        if let Some(ns) = v["mean"]["point_estimate"].as_f64() {
                            let id = d
                                .strip_prefix(dir)
                                .map(|r| r.display().to_string())
                                .unwrap_or_default();
                            out.push((id, ns));
                        }
                    }
                } else if p.file_name().is_some_and(|n| n != "report" && n != "base") {
                    stack.push(p);
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn human_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

/// Write the performance report (markdown) from the raw JSON files of `cargo xtask bench`
/// (`<setting>-mtkd-r<N>.json` from `mtkd bench-steps`, `<setting>-eager-r<N>.json` from
/// `scripts/bench_eager.py`) and, optionally, criterion's results.
/// The fp32 setting a reduced-precision setting of `cargo xtask bench` derives from.
fn fp32_base(setting: &str) -> Option<&'static str> {
    match setting {
        "cifar-bf16" => Some("cifar-fp32"),
        "fmnist-default-bf16" => Some("fmnist-default"),
        _ => None,
    }
}

/// The line that says what a setting ran: its config, the `--set` overrides (absent in files of
/// mtkd before they were recorded) and the plan's student, input, pool and agent mode.
fn setting_line(v: &serde_json::Value) -> String {
    let p = &v["plan"];
    let student = match p["student_head"].as_str() {
        Some(h) if h != "classifier" => {
            format!("{} with the {h} head", p["student"].as_str().unwrap_or("?"))
        }
        _ => p["student"].as_str().unwrap_or("?").to_owned(),
    };
    let sets: String = v["overrides"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str())
                .map(|s| format!(" `--set {s}`"))
                .collect()
        })
        .unwrap_or_default();
    format!(
        "Config `{}`{sets}: student {}, input {}, {} classes, batch {}, {} teachers, \
         feature KD weight {}, agent mode {}.\n\n",
        v["config"].as_str().unwrap_or("?"),
        student,
        p["input"],
        p["num_classes"],
        p["batch_size"],
        p["teachers"].as_array().map(|a| a.len()).unwrap_or(0),
        p["feature_weight"],
        p["agent_mode"].as_str().unwrap_or("?"),
    )
}

pub fn write_report(raw: &Path, criterion: Option<&Path>, command: &str, out: &Path) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(raw)
        .with_context(|| format!("reading {}", raw.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    // setting -> (mtkd files, eager files), in the order of first appearance.
    let mut order: Vec<String> = Vec::new();
    let mut by: std::collections::BTreeMap<String, (Vec<PathBuf>, Vec<PathBuf>)> =
        Default::default();
    for f in &files {
        let stem = f
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let (setting, side) = if let Some(i) = stem.rfind("-mtkd-r") {
            (stem[..i].to_owned(), 0)
        } else if let Some(i) = stem.rfind("-eager-r") {
            (stem[..i].to_owned(), 1)
        } else {
            continue;
        };
        if !order.contains(&setting) {
            order.push(setting.clone());
        }
        let e = by.entry(setting).or_default();
        if side == 0 {
            e.0.push(f.clone());
        } else {
            e.1.push(f.clone());
        }
    }
    if order.is_empty() {
        bail!("no bench results in {}", raw.display());
    }
    let rank = |s: &str| match s {
        "cifar-fp32" => 0,
        "cifar-frozen" => 1,
        "cifar-frozen-channels-last" => 2,
        "cifar-bf16" => 3,
        "fmnist-default" => 4,
        "fmnist-default-bf16" => 5,
        "seg-scenes" => 6,
        "det-scenes" => 7,
        _ => 8,
    };
    order.sort_by_key(|s| rank(s));
    let mut peak = (0.0f64, 0.0f64, 0.0f64);
    let mut peak_shapes = (String::from("?"), String::from("?"));
    let mut torch_version = String::from("?");
    let mut threads = 0i64;
    let mut rounds = 0usize;
    let mut steps = 0usize;
    for (m, e) in by.values() {
        rounds = rounds.max(m.len());
        for f in m {
            let v = read_json(f)?;
            threads = v["threads"].as_i64().unwrap_or(threads);
            if let Some(t) = v["timings"][0]["step_seconds"].as_array() {
                steps = t.len();
            }
            let p = &v["peak_gflops"];
            if p.is_object() {
                let shape = |k: &str| {
                    p[k].as_array()
                        .map(|a| {
                            format!(
                                "{:?}",
                                a.iter().filter_map(|x| x.as_i64()).collect::<Vec<_>>()
                            )
                        })
                        // Files from before the shape was recorded measured this one.
                        .unwrap_or_else(|| "[64, 128, 32, 32]".into())
                };
                let f = p["conv_forward"].as_f64().unwrap_or(0.0);
                if f > peak.0 {
                    peak.0 = f;
                    peak_shapes.0 = shape("conv_forward_shape");
                }
                let fb = p["conv_forward_backward"].as_f64().unwrap_or(0.0);
                if fb > peak.1 {
                    peak.1 = fb;
                    peak_shapes.1 = shape("conv_forward_backward_shape");
                }
                peak.2 = peak.2.max(p["matmul"].as_f64().unwrap_or(0.0));
            }
        }
        for f in e {
            let v = read_json(f)?;
            if let Some(t) = v["torch"].as_str() {
                torch_version = t.to_owned();
            }
        }
    }
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut md = String::new();
    let now = utc_now();
    md.push_str("# Performance: mtkd against eager PyTorch\n\n");
    md.push_str(&format!(
        "Written by `{command}` on {now}. Machine: {}. libtorch threads: {threads}. \
         Versions: mtkd {}, tch 0.26.0, libtorch / PyTorch {torch_version} (the PyPI wheel; \
         the eager reference runs in the same wheel's Python), {rustc}.\n\n",
        machine(),
        env!("CARGO_PKG_VERSION"),
    ));
    md.push_str(&format!(
        "Each figure is the median over {rounds} round(s) (range in brackets when there are \
         more) of {steps} timed training steps after warm-up steps, the end of the epoch \
         included (the published agent's update). In each round, every setting runs `mtkd \
         bench-steps` (the trainer's own step on batches of the config's loader) and \
         `scripts/bench_eager.py` (the same step written in eager PyTorch, the same \
         TorchScript teachers, random inputs) back to back, their order alternating between \
         rounds. Ratio = mtkd images/s / eager images/s. GFLOP/s = the step's floating-point \
         operations (counted by `torch.utils.flop_counter` on the eager step, 2 per \
         multiply-add) times steps per second.\n\n"
    ));
    if peak.0 <= 0.0 {
        md.push_str(
            "**Measured peak of this machine**: not measured in this run (the `cifar-fp32` \
             setting measures it, `mtkd bench-steps --peak`).\n\n",
        );
    } else {
        md.push_str(&format!(
            "**Measured peak of this machine** (libtorch through tch, best of 5 per shape): the \
         best 3x3 convolution (channels in = out) of {}: forward {:.1} GFLOP/s (on {}), \
         forward and backward {:.1} GFLOP/s (on {}); 2048 x 2048 matmul {:.1} GFLOP/s.\n\n",
            PEAK_CONV_SHAPES
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            peak.0,
            peak_shapes.0,
            peak.1,
            peak_shapes.1,
            peak.2
        ));
    }
    md.push_str(
        "The peak is the best of a few convolution shapes, not the machine's limit: a \
         network's convolutions can still run faster (then the \"of peak\" columns pass \
         100%). Settings `cifar-frozen` \
         and `cifar-frozen-channels-last` load the same teachers exported with \
         `scripts/export_teacher.py --optimize` (frozen: BatchNorm folded into the \
         convolutions) and `--optimize --channels-last`; `cifar-bf16` (`--precision bf16`) runs \
         only on a CPU with native bfloat16 (AVX512-BF16 or AMX), since libtorch emulates it \
         elsewhere; `fmnist-default-bf16` (same condition) runs the default config's \
         teachers, trained by mtkd in fp32, in bfloat16 through `distill.teacher_precision = \
         \"bf16\"`, and the eager reference casts its twins of them the same way. The eager \
         reference loads the same files, so a faster export speeds up both sides alike. mtkd \
         runs with its defaults, which on the CPU include `run.channels_last` (the student's, \
         adapters' and teachers' convolution weights re-laid NHWC, a frozen file excepted); \
         the eager step is written as a PyTorch user writes it, in NCHW.\n\n",
    );
    for s in &order {
        let (m, e) = &by[s];
        let mf = collect(m)?;
        let ef = collect(e)?;
        md.push_str(&format!("## {s}\n\n"));
        // The plan and the agent's buffer, from the setting's first mtkd file.
        let first: Option<serde_json::Value> = m.first().map(|f| read_json(f)).transpose()?;
        if let Some(v) = &first {
            md.push_str(&setting_line(v));
        }
        let has_eager = !ef.is_empty();
        if has_eager {
            md.push_str(
                "| mode | mtkd images/s | eager images/s | ratio | mtkd GFLOP/s | of conv fwd+bwd peak | teacher share (mtkd) | teacher fwd GFLOP/s (mtkd) | of conv fwd peak |\n|---|---|---|---|---|---|---|---|---|\n",
            );
        } else {
            md.push_str("| mode | mtkd images/s | teacher share |\n|---|---|---|\n");
        }
        let batch = first
            .as_ref()
            .and_then(|v| v["plan"]["batch_size"].as_f64())
            .unwrap_or(1.0);
        for mode in BenchMode::ALL {
            let Some(a) = mf.get(mode.name()) else {
                continue;
            };
            let ips = median(a.ips.clone());
            let share = median(a.teacher_share.clone());
            if !has_eager {
                md.push_str(&format!(
                    "| {} | {} | {:.0}% |\n",
                    mode.name(),
                    spread(&a.ips),
                    100.0 * share
                ));
                continue;
            }
            // The cached step is set against the eager MTKD-RL step (which runs the teachers);
            // its FLOPs are the step's without the teachers' forward passes.
            let cached = mode == BenchMode::MtkdRlCached;
            let eager_mode = if cached { "mtkd-rl" } else { mode.name() };
            let b = ef.get(eager_mode).cloned().unwrap_or_default();
            let eips = median(b.ips.clone());
            let flops = if cached {
                b.flops.zip(b.teacher_flops).map(|(f, t)| f - t)
            } else {
                b.flops
            };
            let gflops = flops.map(|f| f * ips / batch / 1e9);
            let tg = b.teacher_flops.filter(|_| !cached).and_then(|f| {
                let s = median(a.teacher_step_seconds.clone());
                (s > 0.0).then(|| f / s / 1e9)
            });
            let pct = |x: Option<f64>, p: f64| {
                x.filter(|_| p > 0.0)
                    .map(|x| format!("{:.0}%", 100.0 * x / p))
                    .unwrap_or_else(|| "n/a".into())
            };
            let num = |x: Option<f64>| x.map(|x| format!("{x:.1}")).unwrap_or_else(|| "n/a".into());
            md.push_str(&format!(
                "| {} | {} | {} | {:.2} | {} | {} | {:.0}% | {} | {} |\n",
                if cached {
                    "mtkd-rl-cached (vs eager mtkd-rl)"
                } else {
                    mode.name()
                },
                spread(&a.ips),
                spread(&b.ips),
                ips / eips,
                num(gflops),
                pct(gflops, peak.1),
                100.0 * share,
                num(tg),
                pct(tg, peak.0),
            ));
        }
        let task = first
            .as_ref()
            .and_then(|v| v["plan"]["task"].as_str().map(str::to_owned))
            .unwrap_or_default();
        if has_eager && (task == "segmentation" || task == "detection") {
            md.push_str(&format!(
                "\nThe eager {task} step: the student's PyTorch twin with the same head \
                 (`scripts/student_zoo.py`; its parameter names and shapes are checked against \
                 mtkd's student) and the mtkd-trained teachers rebuilt from their weights, run \
                 through TorchScript; random images with random {} whose FLOPs do not depend \
                 on their values; {}. KD1 and AVER compute only what their loss uses (mtkd also \
                 computes the strategies' signals, each teacher's {} among them); MTKD-RL \
                 computes the agent's state from them, and in clean mode the student's two \
                 eval-mode forward passes around the update for the reward, which the GFLOP/s \
                 count.\n",
                if task == "segmentation" {
                    "masks"
                } else {
                    "boxes (1 to the batches' most objects per image)"
                },
                if task == "segmentation" {
                    "per-pixel cross-entropy and pixel-wise KD averaged over each image's \
                     labelled pixels"
                } else {
                    "the FCOS assignment of the boxes to the locations in every step, focal, \
                     GIoU and centerness losses, foreground-weighted class KD and box KD"
                },
                if task == "segmentation" {
                    "pixel cross-entropy and entropy"
                } else {
                    "FCOS loss and the entropy of its pooled class logits"
                },
            ));
        }
        if mf.contains_key(BenchMode::MtkdRlCached.name()) {
            md.push_str(
                "\n`mtkd-rl-cached`: the MTKD-RL step from the second epoch on with \
                 `distill.output_cache_mb` (each sample's teacher outputs kept in memory after \
                 the first epoch, which needs `data.augment` off). The teachers are not run, so \
                 this is less work than the eager row it is set against (eager MTKD-RL, \
                 teachers run). It is a design lever that applies only to runs without \
                 augmentation, not the same work done faster. Its GFLOP/s count the step \
                 without the teachers' forward passes.\n",
            );
        }
        if let Some(v) = &first {
            let p = &v["plan"];
            let rl = v["timings"]
                .as_array()
                .and_then(|a| a.iter().find(|t| t["mode"] == "mtkd-rl"));
            if let (Some(t), Some(n)) = (rl, p["epoch_steps"].as_u64()) {
                let steps = t["step_seconds"].as_array().map(|a| a.len()).unwrap_or(0) as u64;
                let per = t["buffered_bytes"].as_u64().unwrap_or(0) as f64 / steps.max(1) as f64;
                let mb = |k: u64| per * k as f64 / (1u64 << 20) as f64;
                let cap = p["agent_step"].as_u64().unwrap_or(0);
                let clean = p["agent_buffer_steps"].as_u64().unwrap_or(0);
                let mode = p["agent_mode"].as_str().unwrap_or("?");
                md.push_str(&format!(
                    "\nAgent memory (measured after the timed steps, {mode} mode): {:.1} KB of \
                     buffer per step. Parity mode, the published agent, keeps every step until \
                     agent_step = {cap} steps, so its buffer grows with the epoch up to {:.1} MB; \
                     this config's data has {n} steps per epoch, so it holds {} ({:.1} MB). \
                     Clean and meta modes keep buffer_steps = {clean} steps (about {:.1} MB at \
                     the same size per step), whatever the epoch's length.\n",
                    per / 1024.0,
                    mb(cap),
                    if n <= cap {
                        "the whole epoch"
                    } else {
                        "part of the epoch"
                    },
                    mb(n.min(cap)),
                    mb(clean),
                ));
            }
        }
        if let (Some(r), Some(a)) = (mf.get("mtkd-rl"), mf.get("aver")) {
            md.push_str(&format!(
                "\nMTKD-RL / AVER (mtkd): {:.3} of AVER's images/s.\n",
                median(r.ips.clone()) / median(a.ips.clone())
            ));
        }
        md.push_str(&breakdown(&mf));
        // A reduced-precision setting against the fp32 setting it derives from: mtkd with
        // bf16 teachers against the eager fp32 step a user would otherwise run.
        if let Some(base) = fp32_base(s).filter(|b| by.contains_key(*b)) {
            let (bm, be) = &by[base];
            let (bmf, bef) = (collect(bm)?, collect(be)?);
            md.push_str(&format!(
                "\nAgainst the fp32 setting `{base}` (the reduced-precision target: mtkd with \
                 bf16 teachers against the eager step with fp32 teachers, same student, data \
                 and losses):\n\n| mode | mtkd bf16 images/s | mtkd fp32 images/s | eager fp32 \
                 images/s | mtkd bf16 / eager fp32 | mtkd bf16 / mtkd fp32 |\n|---|---|---|---|---|---|\n"
            ));
            for mode in [BenchMode::Kd1, BenchMode::Aver, BenchMode::MtkdRl] {
                let (Some(a), Some(b), Some(c)) = (
                    mf.get(mode.name()),
                    bmf.get(mode.name()),
                    bef.get(mode.name()),
                ) else {
                    continue;
                };
                let (x, y, z) = (
                    median(a.ips.clone()),
                    median(b.ips.clone()),
                    median(c.ips.clone()),
                );
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {:.2} | {:.2} |\n",
                    mode.name(),
                    spread(&a.ips),
                    spread(&b.ips),
                    spread(&c.ips),
                    x / z,
                    x / y
                ));
            }
        }
        md.push('\n');
    }
    if let Some(dir) = criterion {
        let means = criterion_means(dir);
        if !means.is_empty() {
            md.push_str(
                "## Criterion benches (mean time per call)\n\n`cargo bench -p mtkd-distill-core -p mtkd-rl-weighting -p mtkd-vision-tasks --bench losses --bench agent --bench vision` (one libtorch thread in the loss and agent benches):\n\n| bench | mean |\n|---|---|\n",
            );
            for (id, ns) in means {
                md.push_str(&format!("| {id} | {} |\n", human_ns(ns)));
            }
            md.push('\n');
        }
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    mtkd_records::fsio::write_atomic(out, md.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_line_names_its_overrides_and_reads_older_files_without_them() {
        let plan = serde_json::json!({
            "student": "cnn-small", "student_head": "classifier", "input": [1, 28, 28],
            "num_classes": 10, "batch_size": 64, "teachers": ["a", "b", "c"],
            "feature_weight": 5.0, "agent_mode": "parity"
        });
        let with = serde_json::json!({
            "config": "configs/default.toml", "plan": plan,
            "overrides": ["distill.agent.mode=\"parity\"", "distill.teacher_precision=\"bf16\""]
        });
        let line = setting_line(&with);
        assert!(
            line.starts_with(
                "Config `configs/default.toml` `--set distill.agent.mode=\"parity\"` \
                 `--set distill.teacher_precision=\"bf16\"`: student cnn-small,"
            ),
            "{line}"
        );
        assert!(
            line.contains("3 teachers") && line.contains("agent mode parity"),
            "{line}"
        );
        let older = serde_json::json!({"config": "x.toml", "plan": plan});
        assert!(setting_line(&older).starts_with("Config `x.toml`: student cnn-small,"));
    }

    #[test]
    fn the_breakdown_shows_each_part_and_the_reward_share() {
        let mut mf = SettingFigures::new();
        let put = |mf: &mut SettingFigures, mode: BenchMode, parts: Vec<[f64; 6]>| {
            mf.insert(
                mode.name().to_owned(),
                ModeFigures {
                    parts,
                    ..Default::default()
                },
            );
        };
        // Files of mtkd before the breakdown carry no parts: nothing is written.
        put(&mut mf, BenchMode::Aver, vec![]);
        assert_eq!(breakdown(&mf), "");
        put(
            &mut mf,
            BenchMode::Aver,
            vec![[100.0, 60.0, 5.0, 0.1, 0.0, 0.0]],
        );
        // Two rounds: the median of each part.
        put(
            &mut mf,
            BenchMode::MtkdRl,
            vec![
                [140.0, 60.0, 5.0, 0.5, 30.0, 1.0],
                [150.0, 62.0, 5.0, 0.7, 34.0, 1.0],
            ],
        );
        let md = breakdown(&mf);
        assert!(
            md.contains("| aver | 100.0 | 60.0 | 5.0 | 0.1 | 0.0 | 0.0 | 34.9 |"),
            "{md}"
        );
        assert!(
            md.contains("| mtkd-rl | 145.0 | 61.0 | 5.0 | 0.6 | 32.0 | 1.0 | 45.4 |"),
            "{md}"
        );
        assert!(!md.contains("| kd1 |"), "{md}");
        // Reward 32.0 ms of 145.0 (22%); AVER 100 / (145 - 32) = 0.885; agent 0.6 + 1.0.
        assert!(md.contains("is 1.6 ms per step"), "{md}");
        assert!(md.contains("is 32.0 ms, 22% of the MTKD-RL step"), "{md}");
        assert!(md.contains("at 0.885 of AVER's rate"), "{md}");
        // A parity agent has no reward forwards: no such sentence.
        put(
            &mut mf,
            BenchMode::MtkdRl,
            vec![[101.0, 60.0, 5.0, 0.5, 0.0, 1.0]],
        );
        assert!(!breakdown(&mf).contains("reward of its mode"));
    }
}
