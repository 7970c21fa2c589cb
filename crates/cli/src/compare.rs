//! The strategy comparison: one base config, every weighting strategy under identical settings
//! and seeds, and a markdown table of the results. The binary runs each planned config as its own
//! `mtkd train` process (so peak memory is per run); this module plans and tabulates.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};

use mtkd_engine::config::{Config, DistillConfig, StrategyKind};
use mtkd_engine::record::{EpochRecord, Summary};
use mtkd_rl_weighting::agent::{AgentConfig, Mix, Mode};

/// One planned run.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Row label in the table (e.g. `mtkd-rl parity dynamic`).
    pub strategy: String,
    pub seed: u64,
    pub config: Config,
    /// Folder name of the run inside the comparison folder.
    pub dir_name: String,
}

/// The strategies of the comparison table, in order, for a config's teacher pool.
pub fn strategies(base: &Config) -> Result<Vec<(String, DistillConfig)>> {
    let mut d = base
        .distill
        .clone()
        .context("the base config needs a [distill] section (temperature, weights)")?;
    if base.teachers.is_empty() {
        bail!("the base config has no [[teachers]] to compare strategies over");
    }
    d.teacher = None;
    d.fixed = None;
    let oracle = d.oracle.take();
    // Pruning is its own row (the meta mode with it); every other row keeps the whole pool.
    let prune = d.prune.take().unwrap_or_default();
    let with = |strategy: StrategyKind| DistillConfig {
        strategy,
        ..d.clone()
    };
    let mut out = vec![("no-kd".to_owned(), with(StrategyKind::None))];
    for t in &base.teachers {
        out.push((
            format!("single {}", t.name),
            DistillConfig {
                teacher: Some(t.name.clone()),
                ..with(StrategyKind::Single)
            },
        ));
    }
    if let Some(table) = oracle {
        out.push((
            ORACLE.to_owned(),
            DistillConfig {
                fixed: Some(table),
                ..with(StrategyKind::Fixed)
            },
        ));
    }
    out.push((AVER.to_owned(), with(StrategyKind::Equal)));
    // The control for the parity agent's loss scale: AVER with its all-ones epoch 0.
    out.push((
        "equal, ones in epoch 1 (control) †".to_owned(),
        DistillConfig {
            equal_ones_epochs: 1,
            ..with(StrategyKind::Equal)
        },
    ));
    out.push(("ebkd ‡".to_owned(), with(StrategyKind::Ebkd)));
    out.push((
        "ca-mkd (logit weights)".to_owned(),
        with(StrategyKind::CaMkd),
    ));
    out.push(("aekd".to_owned(), with(StrategyKind::Aekd)));
    let look_ahead = base.data.task().look_ahead();
    if look_ahead {
        out.push((
            "mmkd (last-layer look-ahead)".to_owned(),
            with(StrategyKind::Mmkd),
        ));
    }
    let agent = d.agent.clone().unwrap_or_default();
    for (label, mode, mix) in [
        ("mtkd-rl parity fixed †", Mode::Parity, Mix::Fixed),
        ("mtkd-rl parity dynamic †", Mode::Parity, Mix::Dynamic),
        ("mtkd-rl clean", Mode::Clean, Mix::Fixed),
        ("mtkd-rl meta", Mode::Meta, Mix::Fixed),
    ] {
        let a = AgentConfig {
            mode,
            mix,
            ..agent.clone()
        };
        out.push((
            label.to_owned(),
            DistillConfig {
                agent: Some(a),
                ..with(StrategyKind::MtkdRl)
            },
        ));
    }
    out.push((
        "mtkd-rl meta + prune".to_owned(),
        DistillConfig {
            agent: Some(AgentConfig {
                mode: Mode::Meta,
                mix: Mix::Fixed,
                ..agent.clone()
            }),
            prune: Some(prune),
            ..with(StrategyKind::MtkdRl)
        },
    ));
    Ok(out)
}

/// Row label of the pool's oracle (`[distill.oracle]`).
pub const ORACLE: &str = "oracle (fixed weights)";
/// Row label of equal weights, the reference of the headroom.
pub const AVER: &str = "equal (AVER)";

/// The legend of the marks in the row labels: rows whose total KD weight differs from AVER's.
pub const MARKS: &str = "† distils at M times AVER's KD weight in epoch 1 (the parity agent's all-ones epoch 0, docs/METHOD.md section 3), 1 afterwards. \
‡ weights sum to M - 1 in every epoch (EBKD's definition). Every other row's weights sum to 1 per sample in every epoch.";

/// The `--only` name of a row: its label in lower case, words joined by `-`, marks dropped
/// (`equal-aver`, `single-t1`, `mtkd-rl-meta-prune`).
pub fn row_name(label: &str) -> String {
    slug(label)
}

/// Names that select several rows: every `single <teacher>` row, every agent row.
pub const GROUPS: [&str; 2] = ["single", "mtkd-rl"];

/// The rows an `--only` name selects (exact row name, or a group of [`GROUPS`]).
fn selects(name: &str, label: &str) -> bool {
    let row = row_name(label);
    row == name || (GROUPS.contains(&name) && row.starts_with(&format!("{name}-")))
}

/// The `--only` names of a config's comparison: one per row, then the groups.
pub fn names(base: &Config) -> Result<Vec<String>> {
    let mut v: Vec<String> = strategies(base)?.iter().map(|(l, _)| row_name(l)).collect();
    v.extend(GROUPS.iter().map(|g| (*g).to_owned()));
    Ok(v)
}

/// Every (strategy, seed) run: seeds `first .. first + seeds`, where `first` defaults to
/// `base.run.seed` (the teachers' seeds stay those of `base.run.seed` whatever `first` is, so
/// that comparisons split over seeds share one teacher pool). `only` keeps the rows it names
/// (see [`names`]); a name that selects no row is an error listing the names.
pub fn plan(
    base: &Config,
    first: Option<u64>,
    seeds: u64,
    only: Option<&[String]>,
) -> Result<Vec<Planned>> {
    let first = first.unwrap_or(base.run.seed);
    let mut out = Vec::new();
    let strategies = strategies(base)?;
    if let Some(only) = only {
        let unknown: Vec<&String> = only
            .iter()
            .filter(|o| !strategies.iter().any(|(l, _)| selects(o, l)))
            .collect();
        if !unknown.is_empty() || only.is_empty() {
            bail!(
                "--only {}: no such row; the rows of this comparison are {}",
                unknown
                    .iter()
                    .map(|s| format!("`{s}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                names(base)?.join(", ")
            );
        }
    }
    // Seed-major: an interrupted comparison still has every strategy for its first seeds.
    for s in 0..seeds {
        for (label, distill) in &strategies {
            if let Some(only) = only {
                if !only.iter().any(|o| selects(o, label)) {
                    continue;
                }
            }
            let mut c = base.clone();
            c.distill = Some(distill.clone());
            c.run.seed = first + s;
            // Teachers stay the same across seeds: pin their seeds to the base run's defaults.
            for t in c.teachers.iter_mut() {
                if t.arch.is_some() && t.seed.is_none() {
                    t.seed = Some(mtkd_engine::config::teacher_seed(base.run.seed, &t.name));
                }
            }
            c.run.name = format!("{}-{}", base.run.name, slug(label));
            let dir_name = format!("{}-seed{}", slug(label), c.run.seed);
            out.push(Planned {
                strategy: label.clone(),
                seed: c.run.seed,
                config: c,
                dir_name,
            });
        }
    }
    Ok(out)
}

fn slug(s: &str) -> String {
    let mut out = String::new();
    for ch in s.chars() {
        if ch.is_ascii_alphanumeric() {
            out.push(ch.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_owned()
}

/// A finished run as the table needs it.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub strategy: String,
    pub summary: Summary,
    pub history: Vec<EpochRecord>,
    pub peak_rss_mb: Option<f64>,
}

/// Read a finished run folder.
pub fn read_run(strategy: &str, dir: &Path) -> Result<RunResult> {
    let summary: Summary = serde_json::from_slice(&std::fs::read(dir.join("summary.json"))?)
        .with_context(|| format!("reading {}", dir.join("summary.json").display()))?;
    let history = std::fs::read_to_string(dir.join("metrics.jsonl"))?
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<Vec<EpochRecord>, _>>()?;
    let peak_rss_mb = summary.peak_rss_mb;
    Ok(RunResult {
        strategy: strategy.to_owned(),
        summary,
        history,
        peak_rss_mb,
    })
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n.max(1.0);
    let s = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, s)
}

/// The markdown table: per strategy, mean ± sample std over seeds of the final and best test
/// top-1, seconds per epoch, and peak resident memory.
pub fn table(results: &[RunResult]) -> String {
    let mean_final = |label: &str| -> Option<f64> {
        let v: Vec<f64> = results
            .iter()
            .filter(|r| r.strategy == label)
            .map(|r| r.summary.final_value)
            .collect();
        (!v.is_empty()).then(|| mean_std(&v).0)
    };
    let headroom = match (mean_final(ORACLE), mean_final(AVER)) {
        (Some(o), Some(a)) => Some((o, a)),
        _ => None,
    };
    let mut by: BTreeMap<usize, (String, Vec<&RunResult>)> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for r in results {
        let idx = match order.iter().position(|s| *s == r.strategy) {
            Some(i) => i,
            None => {
                order.push(r.strategy.clone());
                order.len() - 1
            }
        };
        by.entry(idx)
            .or_insert_with(|| (r.strategy.clone(), Vec::new()))
            .1
            .push(r);
    }
    let primary = results
        .first()
        .map(|r| r.summary.metric.clone())
        .unwrap_or_else(|| "top1".into());
    let label = mtkd_vision_tasks::task::metric_label(&primary).to_owned();
    let extras = mtkd_vision_tasks::task::table_scalars_for(&primary);
    let mut out = String::new();
    let extra_head: String = extras
        .iter()
        .map(|k| {
            let l = mtkd_vision_tasks::task::metric_label(k);
            format!(" final {l} (%) | {l} at best (%) |")
        })
        .collect();
    let _ = writeln!(
        out,
        "| strategy | seeds | final {label} (%) | best {label} (%) |{extra_head} share of headroom | s / epoch | of which teachers | peak RSS (MB) |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|{}---|---|---|---|",
        "---|---|".repeat(extras.len())
    );
    for (_, (name, runs)) in by {
        let finals: Vec<f64> = runs.iter().map(|r| r.summary.final_value).collect();
        let bests: Vec<f64> = runs.iter().map(|r| r.summary.best_value).collect();
        let extra_cells: String = extras
            .iter()
            .map(|k| {
                let f: Vec<f64> = runs.iter().map(|r| r.summary.final_report.get(k)).collect();
                let b: Vec<f64> = runs.iter().map(|r| r.summary.best_report.get(k)).collect();
                let ((fm, fs), (bm, bs)) = (mean_std(&f), mean_std(&b));
                format!(" {fm:.2} ± {fs:.2} | {bm:.2} ± {bs:.2} |")
            })
            .collect();
        let secs: Vec<f64> = runs
            .iter()
            .map(|r| {
                r.history.iter().map(|h| h.seconds).sum::<f64>() / r.history.len().max(1) as f64
            })
            .collect();
        let teacher_secs: Vec<f64> = runs
            .iter()
            .map(|r| {
                r.history.iter().map(|h| h.teacher_seconds).sum::<f64>()
                    / r.history.len().max(1) as f64
            })
            .collect();
        let (tm, ts) = mean_std(&teacher_secs);
        let mem: Vec<f64> = runs.iter().filter_map(|r| r.peak_rss_mb).collect();
        let (fm, fs) = mean_std(&finals);
        let (bm, bs) = mean_std(&bests);
        let (sm, ss) = mean_std(&secs);
        let mem = if mem.is_empty() {
            "n/a".to_owned()
        } else {
            let (mm, ms) = mean_std(&mem);
            format!("{mm:.0} ± {ms:.0}")
        };
        let share = match headroom {
            Some((o, a)) if (o - a).abs() > 1e-9 => format!("{:.0}%", 100.0 * (fm - a) / (o - a)),
            _ => "n/a".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {name} | {} | {fm:.2} ± {fs:.2} | {bm:.2} ± {bs:.2} |{extra_cells} {share} | {sm:.1} ± {ss:.1} | {tm:.1} ± {ts:.1} | {mem} |",
            runs.len()
        );
    }
    match headroom {
        Some((o, a)) => {
            let _ = writeln!(
                out,
                "\nHeadroom (oracle - AVER, final {label}): {:+.2} points ({o:.2} - {a:.2}). \"share of headroom\" = (row - AVER) / (oracle - AVER).",
                o - a
            );
        }
        None => {
            let why = match (mean_final(ORACLE).is_some(), mean_final(AVER).is_some()) {
                (false, false) => {
                    "neither the oracle row nor AVER's (the pool names no oracle in \
                     `[distill.oracle]`, or `--only` left the rows out)"
                }
                (false, true) => {
                    "no oracle row (the pool names no oracle in `[distill.oracle]`, or `--only` \
                     left the row out)"
                }
                _ => "no AVER row (`--only` left it out)",
            };
            let _ = writeln!(
                out,
                "\nNo headroom to read the rows against: the table has {why}."
            );
        }
    }
    if !extras.is_empty() {
        let _ = writeln!(
            out,
            "\n\"at best\" = at the epoch of the best {label} (the same epoch for every column)."
        );
    }
    let _ = writeln!(out, "\n{MARKS}");
    out
}

/// The paragraph under the table on where the teachers' cost went.
pub fn teacher_note(passes: &[mtkd_engine::trainer::TeacherPass], shared: bool) -> String {
    if !shared {
        return "\nEvery run computed its own teacher outputs (`--no-shared-teachers`): \
                \"of which teachers\" is the time of the teachers' forward passes.\n"
            .to_owned();
    }
    let secs: Vec<f64> = passes.iter().flat_map(|p| p.seconds.clone()).collect();
    let mem: Vec<f64> = passes.iter().filter_map(|p| p.peak_rss_mb).collect();
    let mut out = String::from(
        "\nTeacher outputs were computed once per seed by a teacher pass (`mtkd share-teachers`) \
         and every strategy run read them (exact: same batches, frozen teachers), so \
         \"of which teachers\" is the time spent reading them.",
    );
    if !secs.is_empty() {
        let (sm, ss) = mean_std(&secs);
        let _ = write!(out, " The teacher pass took {sm:.1} ± {ss:.1} s per epoch");
        if !mem.is_empty() {
            let (mm, ms) = mean_std(&mem);
            let _ = write!(out, " with a peak RSS of {mm:.0} ± {ms:.0} MB");
        }
        out.push_str(
            "; a standalone run of a strategy costs about its s / epoch minus its reading time \
             plus the pass's s / epoch.",
        );
    }
    out.push('\n');
    out
}
