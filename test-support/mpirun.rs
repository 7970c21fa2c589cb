//! Launching local MPI jobs from tests, shared by the data-parallel tests of mtkd-dist and
//! mtkd-cli through `#[path]` (dev-only, never in a library).
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `mpirun -n N` on this machine: loopback transports, no core binding, one libtorch thread per
/// rank, allowed to run as root (CI). The program and its arguments follow.
pub fn mpirun(n: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-n", &n.to_string(), "--bind-to", "none", "--oversubscribe"])
        .args([
            "--mca",
            "btl",
            "self,vader",
            "--mca",
            "oob_tcp_if_include",
            "lo",
        ])
        .args(["-x", "OMP_NUM_THREADS=1"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd
}

/// Start `cmd` with its output captured.
pub fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun (Debian: openmpi-bin) must be installed for the data-parallel tests")
}

/// Wait for `child` at most `limit`: its exit code and its stdout and stderr, or a test failure
/// naming `what` (a rank hangs).
pub fn wait(mut child: Child, limit: Duration, what: &str) -> (Option<i32>, String) {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (
                out.status.code(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            );
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} did not end within {limit:?}: a rank hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
