//! MPI for data-parallel training: find OpenMPI (and libclang, which the `mpi` crate's bindings
//! need), install them from Debian's packages when they are missing and xtask runs as root, and
//! launch `mpirun -n N mtkd train` on this machine (`cargo xtask train --nproc N`).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The Debian packages the `mpi` feature builds and runs with.
pub const PACKAGES: [&str; 4] = [
    "openmpi-bin",
    "libopenmpi-dev",
    "libclang-dev",
    "pkg-config",
];

/// Whether this machine can build and run the `mpi` feature: `mpirun`, OpenMPI's pkg-config
/// entry and a libclang.
pub fn available() -> bool {
    let ok = |cmd: &mut Command| cmd.output().map(|o| o.status.success()).unwrap_or(false);
    ok(Command::new("mpirun").arg("--version"))
        && ok(Command::new("pkg-config").args(["--exists", "ompi"]))
        && libclang_present()
}

fn libclang_present() -> bool {
    if std::env::var_os("LIBCLANG_PATH").is_some() {
        return true;
    }
    let dirs = [
        "/usr/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
    ];
    let has = |d: &Path| {
        std::fs::read_dir(d).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libclang"))
        })
    };
    dirs.iter().any(|d| has(Path::new(d)))
        || std::fs::read_dir("/usr/lib").is_ok_and(|entries| {
            entries.flatten().any(|e| {
                e.file_name().to_string_lossy().starts_with("llvm-") && has(&e.path().join("lib"))
            })
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Make MPI available, installing Debian's packages as root when it is not; otherwise an
/// error that names the packages.
pub fn ensure() -> Result<()> {
    if available() {
        return Ok(());
    }
    if !is_root() || Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "data-parallel training and its tests need MPI, which this machine lacks: install \
             the Debian packages {} (or your distribution's OpenMPI with its headers, libclang \
             and pkg-config) and run again",
            PACKAGES.join(" ")
        );
    }
    eprintln!(
        "xtask: installing MPI ({}) with apt-get",
        PACKAGES.join(" ")
    );
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        // A fresh machine may have no package lists yet.
        let updated = Command::new("apt-get")
            .args(["update", "-q"])
            .status()
            .context("apt-get update")?;
        if !updated.success() || !install() {
            bail!(
                "apt-get could not install {}: install them by hand",
                PACKAGES.join(" ")
            );
        }
    }
    if !available() {
        bail!(
            "{} are installed but mpirun, pkg-config's ompi or libclang is still missing",
            PACKAGES.join(" ")
        );
    }
    Ok(())
}

/// The cargo arguments that build `package` (mtkd-cli, mtkd-engine or mtkd-dist) with the
/// `mpi` feature when this machine has MPI and the `nccl` feature when the NCCL shim's headers
/// are installed (the same features for tests, `train` and `mtkd`, so that one build serves
/// them all).
pub fn feature_args(package: &str, torch: &crate::torch::Torch) -> Vec<String> {
    let mut features = Vec::new();
    if available() {
        features.push(format!("{package}/mpi"));
    }
    if torch.has_nccl_headers() {
        features.push(format!("{package}/nccl"));
    }
    if features.is_empty() {
        Vec::new()
    } else {
        vec!["--features".into(), features.join(",")]
    }
}

/// `mpirun -n N` on this machine: loopback transports, no core binding (the ranks share the
/// cores: each gets cores / N threads through OMP_NUM_THREADS unless the environment sets it),
/// idle ranks yielding their core. Returns the command line (program first) and the
/// environment it needs (allowed to run as root).
pub fn mpirun_line(n: usize) -> (Vec<String>, Vec<(&'static str, &'static str)>) {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads =
        std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| (cores / n).max(1).to_string());
    let mut line: Vec<String> = ["mpirun", "-n", &n.to_string(), "--bind-to", "none"]
        .map(String::from)
        .to_vec();
    if n > cores {
        line.push("--oversubscribe".into());
    }
    line.extend(
        [
            "--mca",
            "btl",
            "self,vader",
            "--mca",
            "oob_tcp_if_include",
            "lo",
            // Ranks waiting in a collective (e.g. while rank 0 trains teachers) yield their core.
            "--mca",
            "mpi_yield_when_idle",
            "1",
            "-x",
            &format!("OMP_NUM_THREADS={threads}"),
            "-x",
            "MTKD_DATA_DIR",
            "-x",
            "RUST_LOG",
        ]
        .map(String::from),
    );
    let env = if is_root() {
        vec![
            ("OMPI_ALLOW_RUN_AS_ROOT", "1"),
            ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
        ]
    } else {
        Vec::new()
    };
    (line, env)
}

/// [`mpirun_line`] running `program args`.
pub fn mpirun(n: usize, program: &Path, args: &[String]) -> Command {
    let (line, env) = mpirun_line(n);
    let mut cmd = Command::new(&line[0]);
    cmd.args(&line[1..]).arg(program).args(args).envs(env);
    cmd
}

/// `--nproc N` (or `--nproc=N`) taken out of `args`.
pub fn take_nproc(args: &mut Vec<String>) -> Result<Option<usize>> {
    let Some(i) = args
        .iter()
        .position(|a| a == "--nproc" || a.starts_with("--nproc="))
    else {
        return Ok(None);
    };
    let value = match args[i].strip_prefix("--nproc=") {
        Some(v) => {
            let v = v.to_owned();
            args.remove(i);
            v
        }
        None => {
            if i + 1 >= args.len() {
                bail!("--nproc needs a number of processes");
            }
            let v = args.remove(i + 1);
            args.remove(i);
            v
        }
    };
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(Some(n)),
        _ => bail!("--nproc {value}: give a number of processes, 1 or more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nproc_is_taken_out_of_the_arguments() {
        let mut a: Vec<String> = ["--nproc", "2", "--set", "x=1"].map(String::from).to_vec();
        assert_eq!(take_nproc(&mut a).unwrap(), Some(2));
        assert_eq!(a, vec!["--set", "x=1"]);
        let mut a: Vec<String> = ["--nproc=3"].map(String::from).to_vec();
        assert_eq!(take_nproc(&mut a).unwrap(), Some(3));
        assert!(a.is_empty());
        let mut a: Vec<String> = ["--config", "c.toml"].map(String::from).to_vec();
        assert_eq!(take_nproc(&mut a).unwrap(), None);
        assert!(take_nproc(&mut vec!["--nproc".into(), "0".into()]).is_err());
        assert!(take_nproc(&mut vec!["--nproc".into()]).is_err());
    }
}
