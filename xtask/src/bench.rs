//! `cargo xtask bench`: the criterion benches and the end-to-end performance report
//! (docs/PERF.md): mtkd's training step (`mtkd bench-steps`) and the eager-PyTorch reference
//! (`scripts/bench_eager.py`) on the same teachers, interleaved in one invocation, then
//! `mtkd bench-report` writes the tables.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::torch::Torch;

/// A setting of the report: a config, a label, and whether the eager reference runs on it.
struct Setting {
    label: &'static str,
    config: PathBuf,
    /// `--set KEY=VALUE` overrides of the config for this setting.
    sets: Vec<&'static str>,
    eager: bool,
}

struct Options {
    rounds: usize,
    warmup: usize,
    steps: usize,
    criterion: bool,
    dense: bool,
    only: Option<Vec<String>>,
    out: PathBuf,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        rounds: 2,
        warmup: 2,
        steps: 5,
        criterion: true,
        dense: true,
        only: None,
        out: PathBuf::from("docs/PERF.md"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |what: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{what} needs a number"))?
                .parse()
                .with_context(|| format!("{what} needs a number"))
        };
        match a.as_str() {
            "--rounds" => o.rounds = num("--rounds")?.max(1),
            "--warmup" => o.warmup = num("--warmup")?,
            "--steps" => o.steps = num("--steps")?.max(1),
            "--no-criterion" => o.criterion = false,
            "--no-dense" => o.dense = false,
            "--only" => {
                let v = it.next().context("--only needs setting names")?;
                o.only = Some(v.split(',').map(str::to_owned).collect());
            }
            "--out" => {
                o.out = PathBuf::from(it.next().context("--out needs a file")?);
            }
            other => bail!(
                "cargo xtask bench: unknown argument `{other}` (--rounds N, --warmup N, --steps N, \
                 --no-criterion, --no-dense, --only SETTING,..., --out FILE)"
            ),
        }
    }
    Ok(o)
}

/// Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere libtorch
/// emulates it and a bf16 teacher is many times slower than fp32 (measured: docs/PERF.md).
fn native_bf16() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| s.contains("avx512_bf16") || s.contains("amx_bf16"))
        .unwrap_or(false)
}

pub fn bench(torch: &Torch, args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let py = crate::torch_python(torch)?;
    let work = PathBuf::from("runs/bench");
    let raw = work.join("raw");
    std::fs::create_dir_all(&raw).with_context(|| format!("cannot create {}", raw.display()))?;
    for f in std::fs::read_dir(&raw)? {
        let p = f?.path();
        if p.extension().is_some_and(|e| e == "json") {
            std::fs::remove_file(&p)?;
        }
    }
    // 1. The criterion benches (short measurement: the report's figures are their means).
    if o.criterion {
        crate::step(
            "cargo bench",
            crate::cargo(torch).args([
                "bench",
                "-p",
                "mtkd-distill-core",
                "-p",
                "mtkd-rl-weighting",
                "-p",
                "mtkd-vision-tasks",
                "--bench",
                "losses",
                "--bench",
                "agent",
                "--bench",
                "vision",
                "--",
                "--warm-up-time",
                "1",
                "--measurement-time",
                "3",
            ]),
        )?;
    }
    // 2. The CIFAR setting's teachers and data, and the variants of its config.
    let cifar = work.join("cifar");
    let mut variants = vec!["fp32", "opt", "opt-cl"];
    if native_bf16() {
        variants.push("bf16");
    }
    crate::step(
        "scripts/bench_models.py",
        Command::new(&py).args([
            "scripts/bench_models.py",
            "--out",
            &cifar.display().to_string(),
            "--variants",
            &variants.join(","),
        ]),
    )?;
    let base = std::fs::read_to_string("configs/bench-cifar.toml")
        .context("reading configs/bench-cifar.toml")?;
    let mut settings = Vec::new();
    for v in &variants {
        let cfg = if *v == "fp32" {
            PathBuf::from("configs/bench-cifar.toml")
        } else {
            let p = work.join(format!("bench-cifar-{v}.toml"));
            std::fs::write(
                &p,
                base.replace("teachers/fp32/", &format!("teachers/{v}/")),
            )?;
            p
        };
        settings.push(Setting {
            label: match *v {
                "fp32" => "cifar-fp32",
                "opt" => "cifar-frozen",
                "opt-cl" => "cifar-frozen-channels-last",
                _ => "cifar-bf16",
            },
            config: cfg,
            sets: Vec::new(),
            eager: true,
        });
    }
    crate::data::ensure_for_config(
        &Some(PathBuf::from("configs/default.toml")),
        Some(Path::new(&py)),
    )?;
    // The MTKD-RL row measures the published agent (parity mode), which the eager reference
    // implements; the default run's own mode (meta) is measured by the criterion benches.
    const PARITY: &str = "distill.agent.mode=\"parity\"";
    settings.push(Setting {
        label: "fmnist-default",
        config: PathBuf::from("configs/default.toml"),
        sets: vec![PARITY],
        eager: true,
    });
    if native_bf16() {
        // The same teachers (trained by mtkd in fp32) run in bfloat16 by mtkd itself
        // (`distill.teacher_precision`); the eager reference casts its twins the same way.
        settings.push(Setting {
            label: "fmnist-default-bf16",
            config: PathBuf::from("configs/default.toml"),
            sets: vec![PARITY, "distill.teacher_precision=\"bf16\""],
            eager: true,
        });
    }
    if o.dense {
        for (label, cfg) in [
            ("seg-scenes", "configs/seg-scenes.toml"),
            ("det-scenes", "configs/det-scenes.toml"),
        ] {
            crate::data::ensure_for_config(&Some(PathBuf::from(cfg)), Some(Path::new(&py)))?;
            // The eager reference has the clean agent for dense tasks: a preset in meta mode
            // is measured in clean mode (the meta mode's per-pixel cost is a criterion bench).
            settings.push(Setting {
                label,
                config: PathBuf::from(cfg),
                sets: vec!["distill.agent.mode=\"clean\""],
                eager: true,
            });
        }
    }
    if let Some(only) = &o.only {
        let known: Vec<&str> = settings.iter().map(|s| s.label).collect();
        if let Some(bad) = only.iter().find(|n| !known.contains(&n.as_str())) {
            bail!(
                "--only: no setting `{bad}` (settings: {})",
                known.join(", ")
            );
        }
        settings.retain(|s| only.iter().any(|n| n == s.label));
    }
    // 3. Rounds: every setting, mtkd and eager PyTorch back to back, their order alternating
    // from round to round, so that drift of the machine hits both alike.
    let (w, s) = (o.warmup.to_string(), o.steps.to_string());
    for round in 0..o.rounds {
        for st in &settings {
            let mtkd_json = raw.join(format!("{}-mtkd-r{round}.json", st.label));
            let eager_json = raw.join(format!("{}-eager-r{round}.json", st.label));
            let run_mtkd = || -> Result<()> {
                let mut a = vec![
                    "bench-steps".to_owned(),
                    "--config".to_owned(),
                    st.config.display().to_string(),
                    "--warmup".to_owned(),
                    w.clone(),
                    "--steps".to_owned(),
                    s.clone(),
                    "--json".to_owned(),
                    mtkd_json.display().to_string(),
                ];
                for s in &st.sets {
                    a.push("--set".to_owned());
                    a.push((*s).to_owned());
                }
                if st.label == "cifar-fp32" {
                    a.push("--peak".to_owned());
                }
                // The cached step runs no teacher: one CIFAR row of it is enough.
                if (st.label.starts_with("cifar-") && st.label != "cifar-fp32")
                    || st.label.ends_with("-bf16")
                {
                    a.push("--modes".to_owned());
                    a.push("ce,kd1,aver,mtkd-rl".to_owned());
                }
                crate::run_mtkd(torch, &a)
            };
            let run_eager = || -> Result<()> {
                let mut a = vec![
                    "scripts/bench_eager.py".to_owned(),
                    "--plan".to_owned(),
                    mtkd_json.display().to_string(),
                    "--warmup".to_owned(),
                    w.clone(),
                    "--steps".to_owned(),
                    s.clone(),
                    "--json".to_owned(),
                    eager_json.display().to_string(),
                ];
                if round == 0 {
                    a.push("--flops".to_owned());
                }
                crate::step("scripts/bench_eager.py", Command::new(&py).args(&a))
            };
            // The eager side needs the plan that mtkd writes: mtkd first in even rounds; in
            // odd rounds the eager step reads the previous round's plan and runs first.
            if round % 2 == 1 && st.eager {
                let prev = raw.join(format!("{}-mtkd-r{}.json", st.label, round - 1));
                std::fs::copy(&prev, &mtkd_json)?;
                run_eager()?;
                run_mtkd()?;
            } else {
                run_mtkd()?;
                if st.eager {
                    run_eager()?;
                }
            }
        }
    }
    // 4. The report.
    let mut a = vec![
        "bench-report".to_owned(),
        "--raw".to_owned(),
        raw.display().to_string(),
        "--out".to_owned(),
        o.out.display().to_string(),
        "--command".to_owned(),
        format!("cargo xtask bench {}", args.join(" "))
            .trim()
            .to_owned(),
    ];
    if o.criterion {
        a.push("--criterion".to_owned());
        a.push(crate::target_dir()?.join("criterion").display().to_string());
    }
    crate::run_mtkd(torch, &a)?;
    // The raw timings go beside the report (`docs/perf/`), replacing the last run's.
    let keep = o
        .out
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("perf");
    std::fs::create_dir_all(&keep).with_context(|| format!("creating {}", keep.display()))?;
    for e in std::fs::read_dir(&keep)?.flatten() {
        if e.path().extension().is_some_and(|x| x == "json") {
            std::fs::remove_file(e.path())?;
        }
    }
    for e in std::fs::read_dir(&raw)?.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            std::fs::copy(&p, keep.join(e.file_name()))
                .with_context(|| format!("copying {} to {}", p.display(), keep.display()))?;
        }
    }
    println!(
        "wrote {} (raw timings in {})",
        o.out.display(),
        keep.display()
    );
    Ok(())
}
