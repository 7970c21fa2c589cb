//! `cargo xtask`: set-up and orchestration for mtkd (libtorch, data, training, tests, CI).
//!
//! xtask never links libtorch: it installs it, then runs cargo with the environment that
//! `torch-sys` needs. Every command that builds Rust code runs the libtorch set-up first.

mod bench;
mod data;
mod gpu;
mod mpi;
mod nuclei;
mod torch;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

const HELP: &str = "\
cargo xtask <COMMAND> [ARGS]

Commands:
  setup [--nccl]     install (or find) libtorch 2.13.0 for tch 0.26 and print where it is;
                     --nccl adds the CUDA header packages the NCCL backend compiles with
  env                print shell exports so that plain `cargo build` / `cargo test` work too
  data               fetch the full Fashion-MNIST (Debian package dataset-fashion-mnist) into the cache
  train [ARGS]       build mtkd in release and run `mtkd train`; ARGS go to it
                     (default: --config configs/default.toml); --nproc N trains data-parallel
                     on N local processes (mpirun; installs OpenMPI from Debian as root)
  doctor             build mtkd and print libtorch, thread and CUDA information
  test [ARGS]        run the whole test suite (release build); ARGS go to `cargo test`
  ci                 cargo fmt --check, clippy with warnings denied, then the test suite
  mtkd [ARGS]        build and run the mtkd binary with ARGS
  compare [ARGS]     run every weighting strategy with identical settings and seeds and write a
                     markdown table (default: --config configs/default.toml --seeds 3);
                     --nproc N runs each row on N local processes (mpirun)
  teachers [ARGS]    train (or take from the cache) and evaluate a config's teacher pool
                     (default: --config configs/default.toml)
  export-teacher ARGS  wrap a PyTorch model as a TorchScript teacher (scripts/export_teacher.py)
  export-onnx RUN_DIR  export a run's student to ONNX, check it with ONNX Runtime, time one image
                     in both formats (scripts/export_onnx.py)
  bench [ARGS]       criterion benches and the end-to-end report docs/PERF.md: mtkd's training
                     step against eager PyTorch (scripts/bench_eager.py), interleaved, per mode
                     (--rounds N, --warmup N, --steps N, --no-criterion, --no-dense,
                     --only SETTING,..., --out FILE)
  bench-dist [ARGS]  the data-parallel scaling report docs/SCALING.md: the all-reduce's cost per
                     size on N local ranks, one epoch of a config on 1 process and on N ranks,
                     a model of more ranks (--nproc N, default 2; --config FILE, default
                     configs/default.toml; other ARGS go to both `mtkd train`s)
  gpu-bundle --torch-version V
                     build mtkd and its NCCL tests against the PyPI wheel's libtorch V (a GPU
                     machine's PyTorch, e.g. 2.11.0; torch-sys's wrappers of ops V lacks are
                     replaced by errors) into gpu/, for scripts/gpu_check.sh there
  golden             regenerate the golden files of the tests with PyTorch (scripts/golden*.py,
                     scripts/student_zoo.py)

Environment:
  MTKD_CACHE_DIR     where libtorch and datasets are cached (default: $XDG_CACHE_HOME/mtkd or ~/.cache/mtkd)
  LIBTORCH           use this libtorch instead of installing one (must be version 2.13.0)
  MTKD_PYTHON        the Python 3 used to create the torch virtual environment (default: python3)
";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_else(|| "help".to_owned());
    let rest: Vec<String> = args.collect();
    let root = project_root()?;
    std::env::set_current_dir(&root)
        .with_context(|| format!("cannot enter the project root {}", root.display()))?;
    match cmd.as_str() {
        "setup" => {
            let torch = torch::ensure()?;
            if rest.iter().any(|a| a == "--nccl") {
                torch.ensure_nccl_headers()?;
                println!(
                    "CUDA and NCCL headers for the NCCL backend (cargo feature nccl): installed"
                );
            }
            println!("{}", torch.describe());
            Ok(())
        }
        "env" => {
            let torch = torch::ensure()?;
            for (k, v) in torch.cargo_env() {
                println!("export {k}={}", shell_quote(&v));
            }
            println!(
                "export MTKD_DATA_DIR={}",
                shell_quote(&data::data_dir()?.display().to_string())
            );
            Ok(())
        }
        "data" => {
            let dir = data::ensure_fashion_mnist()?;
            println!("Fashion-MNIST is in {}", dir.display());
            let torch = torch::ensure()?;
            if let Some(python) = torch.python() {
                let dir = nuclei::ensure(&python)?;
                println!("the nuclei tiles are in {}", dir.display());
            }
            Ok(())
        }
        "train" => {
            let torch = torch::ensure()?;
            let mut rest = rest;
            let nproc = mpi::take_nproc(&mut rest)?;
            let mut train_args = vec!["train".to_owned()];
            if !rest
                .iter()
                .any(|a| a.starts_with("--config") || a.starts_with("--resume"))
            {
                train_args.push("--config".into());
                train_args.push("configs/default.toml".into());
            }
            train_args.extend(rest);
            data::ensure_for_config(&config_path(&train_args), torch.python().as_deref())?;
            match nproc {
                Some(n) if n > 1 => {
                    mpi::ensure()?;
                    let mut build = cargo(&torch);
                    build.args(["build", "--release", "-p", "mtkd-cli", "--bin", "mtkd"]);
                    build.args(mpi::feature_args("mtkd-cli", &torch));
                    step("cargo build (mtkd with MPI)", &mut build)?;
                    let mtkd = target_dir()?.join("release").join("mtkd");
                    let mut cmd = mpi::mpirun(n, &mtkd, &train_args);
                    torch_env(&mut cmd, &torch);
                    step(&format!("mpirun -n {n} mtkd train"), &mut cmd)
                }
                _ => run_mtkd(&torch, &train_args),
            }
        }
        "bench" => {
            let torch = torch::ensure()?;
            bench::bench(&torch, &rest)
        }
        "gpu-bundle" => {
            let torch = torch::ensure()?;
            gpu::bundle(&torch, &rest)
        }
        "bench-dist" => {
            let torch = torch::ensure()?;
            bench_dist(&torch, rest)
        }
        "doctor" => {
            let torch = torch::ensure()?;
            run_mtkd(&torch, &["doctor".to_owned()])
        }
        "compare" => {
            let torch = torch::ensure()?;
            let mut rest = rest;
            let nproc = mpi::take_nproc(&mut rest)?.filter(|&n| n > 1);
            let mut args = vec!["compare".to_owned()];
            if config_path(&rest).is_none() {
                args.extend(["--config".to_owned(), "configs/default.toml".to_owned()]);
            }
            args.extend(rest);
            data::ensure_for_config(&config_path(&args), torch.python().as_deref())?;
            if let Some(n) = nproc {
                // Every row on N local ranks: mpirun's command line as the rows' launcher.
                mpi::ensure()?;
                let (line, env) = mpi::mpirun_line(n);
                args.extend(["--launcher".to_owned(), line.join(" ")]);
                // Inherited by the rows' mpirun through mtkd compare.
                for (k, v) in env {
                    std::env::set_var(k, v);
                }
            }
            run_mtkd(&torch, &args)
        }
        "teachers" => {
            let torch = torch::ensure()?;
            let mut args = vec!["teachers".to_owned()];
            if config_path(&rest).is_none() {
                args.extend(["--config".to_owned(), "configs/default.toml".to_owned()]);
            }
            args.extend(rest);
            data::ensure_for_config(&config_path(&args), torch.python().as_deref())?;
            run_mtkd(&torch, &args)
        }
        "export-teacher" => {
            let torch = torch::ensure()?;
            python(&torch, "scripts/export_teacher.py", &rest)
        }
        "export-onnx" => {
            let torch = torch::ensure()?;
            python(&torch, "scripts/export_onnx.py", &rest)
        }
        "golden" => {
            let torch = torch::ensure()?;
            for script in [
                "scripts/golden.py",
                "scripts/golden_agent.py",
                "scripts/golden_baselines.py",
                "scripts/golden_mmkd.py",
                "scripts/golden_meta.py",
                "scripts/golden_meta_pixels.py",
                "scripts/golden_det_locations.py",
                "scripts/golden_segmentation.py",
                "scripts/student_zoo.py",
            ] {
                python(&torch, script, &[])?;
            }
            // The detection goldens compare with pycocotools (PyPI), which only they need.
            let py = torch_python(&torch)?;
            step(
                "pip install pycocotools (for scripts/golden_detection.py)",
                Command::new(&py).args(["-m", "pip", "install", "-q", "pycocotools==2.0.11"]),
            )?;
            python(&torch, "scripts/golden_detection.py", &[])
        }
        "mtkd" => {
            let torch = torch::ensure()?;
            run_mtkd(&torch, &rest)
        }
        "test" => {
            let torch = torch::ensure()?;
            test(&torch, &rest)
        }
        "ci" => {
            let torch = torch::ensure()?;
            step(
                "cargo fmt --check",
                cargo(&torch).args(["fmt", "--all", "--", "--check"]),
            )?;
            step(
                "cargo clippy",
                cargo(&torch)
                    .args(["clippy", "--release", "--workspace", "--all-targets"])
                    .args(mpi::feature_args("mtkd-cli", &torch))
                    .args(["--", "-D", "warnings"]),
            )?;
            test(&torch, &rest)
        }
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        other => bail!("unknown command `{other}`\n\n{HELP}"),
    }
}

/// The whole test suite: every workspace crate (xtask's tidy tests included), in release; then
/// the crates' examples run as a user runs them (the engine as a library distils on the
/// committed subset; the teacher crate alone classifies an image with the student it exported).
fn test(torch: &torch::Torch, extra: &[String]) -> Result<()> {
    // The data-parallel tests run two local MPI ranks; the NCCL backend is compiled and linked
    // (its tests need a GPU and are ignored elsewhere).
    mpi::ensure()?;
    if let Err(e) = torch.ensure_nccl_headers() {
        eprintln!("xtask: the NCCL backend is not compiled: {e:#}");
    }
    step(
        "cargo test",
        cargo(torch)
            .args(["test", "--release", "--workspace"])
            .args(mpi::feature_args("mtkd-cli", torch))
            .args(extra),
    )?;
    if !extra.is_empty() {
        return Ok(());
    }
    let out = PathBuf::from("target/examples-run");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let example = |pkg: &str, name: &str, args: &[&str]| -> Result<String> {
        let output = cargo(torch)
            .args(["run", "--release", "--quiet", "-p", pkg, "--example", name])
            .args(if pkg == "mtkd-engine" {
                mpi::feature_args(pkg, torch)
            } else {
                Vec::new()
            })
            .arg("--")
            .args(args)
            .output()
            .with_context(|| format!("running the example {name}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "example {name} failed ({}):\n{stdout}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        println!("example {name}:\n{stdout}");
        Ok(stdout)
    };
    let printed = example(
        "mtkd-engine",
        "distill",
        &["data/fashion-mnist-mini", "target/examples-run"],
    )?;
    if !printed.contains("test top-1") {
        bail!("example distill printed no result");
    }
    // A real test image as a PNG file (the first of the committed subset), written by PIL.
    let png = out.join("first-test-image.png");
    let py = torch_python(torch)?;
    step(
        "example image",
        Command::new(py).args([
            "-c",
            &format!(
                "import gzip, numpy as np\nfrom PIL import Image\n\
                 d = gzip.open('data/fashion-mnist-mini/t10k-images-idx3-ubyte.gz').read()\n\
                 Image.fromarray(np.frombuffer(d[16:16 + 784], dtype=np.uint8).reshape(28, 28)).save(r'{}')",
                png.display()
            ),
        ]),
    )?;
    let student = out.join("run/student.pt");
    let printed = example(
        "mtkd-teachers",
        "classify",
        &[
            &student.to_string_lossy(),
            &png.to_string_lossy(),
            "--channels",
            "1",
            "--size",
            "28",
            "--mean",
            "0.2860",
            "--std",
            "0.3530",
        ],
    )?;
    if !printed.contains("first-test-image.png: class") {
        bail!("example classify printed no prediction");
    }
    // The same student to ONNX, checked against TorchScript by ONNX Runtime (the script fails
    // when the logits differ).
    let run = out.join("run").to_string_lossy().into_owned();
    python(
        torch,
        "scripts/export_onnx.py",
        &[run, "--repeats".to_owned(), "50".to_owned()],
    )?;
    Ok(())
}

fn run_mtkd(torch: &torch::Torch, args: &[String]) -> Result<()> {
    let mut cmd = cargo(torch);
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "--package",
        "mtkd-cli",
        "--bin",
        "mtkd",
    ]);
    cmd.args(mpi::feature_args("mtkd-cli", torch));
    cmd.arg("--");
    cmd.args(args);
    step("mtkd", &mut cmd)
}

/// `cargo xtask bench-dist`: see HELP.
fn bench_dist(torch: &torch::Torch, mut rest: Vec<String>) -> Result<()> {
    mpi::ensure()?;
    let n = mpi::take_nproc(&mut rest)?.unwrap_or(2).max(2);
    let mut train = vec!["train".to_owned()];
    if config_path(&rest).is_none() {
        train.extend(["--config".to_owned(), "configs/default.toml".to_owned()]);
    }
    // One epoch, one libtorch thread per process: the ranks' cores against one process's.
    train.extend(
        ["--set", "train.epochs=1", "--set", "run.threads=1"]
            .iter()
            .map(|s| s.to_string()),
    );
    train.extend(rest.iter().cloned());
    data::ensure_for_config(&config_path(&train), torch.python().as_deref())?;
    let features = mpi::feature_args("mtkd-cli", torch);
    step(
        "cargo build (mtkd with MPI)",
        cargo(torch)
            .args(["build", "--release", "-p", "mtkd-cli", "--bin", "mtkd"])
            .args(&features),
    )?;
    step(
        "cargo build (the all-reduce example)",
        cargo(torch).args([
            "build",
            "--release",
            "-p",
            "mtkd-dist",
            "--features",
            "mpi",
            "--example",
            "allreduce",
        ]),
    )?;
    let target = target_dir()?.join("release");
    let out = PathBuf::from("target/bench-dist");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let mut ar = mpi::mpirun(n, &target.join("examples").join("allreduce"), &[]);
    torch_env(&mut ar, torch);
    let output = ar.output().context("running the all-reduce example")?;
    if !output.status.success() {
        bail!(
            "the all-reduce example failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let allreduce = out.join("allreduce.jsonl");
    std::fs::write(&allreduce, &output.stdout)?;
    let mtkd = target.join("mtkd");
    let with_out = |dir: &str| {
        let mut a = train.clone();
        a.extend(["--out".to_owned(), out.join(dir).display().to_string()]);
        a
    };
    let mut one = Command::new(&mtkd);
    one.args(with_out("one")).env("OMP_NUM_THREADS", "1");
    torch_env(&mut one, torch);
    step("mtkd train (one process)", &mut one)?;
    let mut many = mpi::mpirun(n, &mtkd, &with_out("many"));
    torch_env(&mut many, torch);
    step(&format!("mpirun -n {n} mtkd train"), &mut many)?;
    let shown = std::iter::once(format!("cargo xtask bench-dist --nproc {n}"))
        .chain(rest.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    step(
        "mtkd scaling-report",
        Command::new(&mtkd).args([
            "scaling-report",
            "--allreduce",
            &allreduce.display().to_string(),
            "--one",
            &out.join("one").display().to_string(),
            "--many",
            &out.join("many").display().to_string(),
            "--command",
            &shown,
            "--out",
            "docs/SCALING.md",
        ]),
    )?;
    println!("docs/SCALING.md written");
    Ok(())
}

/// Run a project script with the Python that provides libtorch (the same torch as the build).
fn python(torch: &torch::Torch, script: &str, args: &[String]) -> Result<()> {
    let py = torch_python(torch)?;
    step(script, Command::new(py).arg(script).args(args))
}

/// The Python that provides libtorch (the set-up's venv, or `MTKD_TORCH_PYTHON`).
fn torch_python(torch: &torch::Torch) -> Result<String> {
    torch
        .cargo_env()
        .into_iter()
        .find(|(k, _)| k == "MTKD_TORCH_PYTHON")
        .map(|(_, v)| v)
        .or_else(|| std::env::var("MTKD_TORCH_PYTHON").ok())
        .context(
            "LIBTORCH is set to your own libtorch, so xtask has no Python with torch: set MTKD_TORCH_PYTHON \
             to a python that has torch 2.13.0 (and torchvision) installed",
        )
}

/// The `--config` value of an argument list, if any.
fn config_path(args: &[String]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// The cargo target folder (`CARGO_TARGET_DIR`, else `target/` of the project).
fn target_dir() -> Result<PathBuf> {
    Ok(match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => project_root()?.join("target"),
    })
}

/// `$CARGO` (the cargo that runs xtask) with the libtorch environment and the data directory.
fn cargo(torch: &torch::Torch) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    torch_env(&mut cmd, torch);
    cmd
}

/// The libtorch environment and the data directory, for cargo and for the binaries it built.
fn torch_env(cmd: &mut Command, torch: &torch::Torch) {
    for (k, v) in torch.cargo_env() {
        cmd.env(k, v);
    }
    if std::env::var_os("MTKD_DATA_DIR").is_none() {
        if let Ok(dir) = data::data_dir() {
            cmd.env("MTKD_DATA_DIR", dir);
        }
    }
}

fn step(what: &str, cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn project_root() -> Result<PathBuf> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    Ok(dir.parent().map(Path::to_path_buf).unwrap_or(dir))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The cache directory shared by libtorch and datasets.
pub(crate) fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MTKD_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("mtkd"));
    }
    match std::env::var_os("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("mtkd")),
        None => bail!("neither MTKD_CACHE_DIR, XDG_CACHE_HOME nor HOME is set: set MTKD_CACHE_DIR to a folder where mtkd may keep libtorch and datasets"),
    }
}

#[cfg(test)]
mod tidy;
