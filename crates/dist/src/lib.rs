//! The collective layer of data-parallel training (docs/ARCHITECTURE.md, "Data-parallel
//! training").
//!
//! - [`DistEnv`] reads who this process is from the launcher's environment: torchrun
//!   (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`), OpenMPI's `mpirun` (`OMPI_COMM_WORLD_*`) or Slurm's
//!   `srun` (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`).
//! - [`Collective`] is what the engine needs of a communication library: all-reduce (sum),
//!   all-gather of rows, broadcast, barrier and abort, on tensors. [`Solo`] is the one-process
//!   implementation; `Mpi` (cargo feature `mpi`) runs over an MPI library (OpenMPI, MPICH);
//!   `Nccl` (cargo feature `nccl`) over libtorch's own `c10d::ProcessGroupNCCL` on GPUs. There
//!   is no home-made transport.
//! - On top of it, engine-independent helpers: the bucketed mean all-reduce of gradients
//!   ([`all_reduce_grads`]), f64 statistics ([`all_reduce_f64`]), row gathers in the global
//!   batch's order ([`all_gather_rows`]), parameter broadcast ([`broadcast_tensors`]), the
//!   drift check ([`check_same`]) and the contiguous shard of a batch ([`shard`]).

use std::fmt::Debug;
use std::ops::Range;

use tch::{Device, Kind, Tensor};

#[cfg(feature = "mpi")]
mod mpi_backend;
#[cfg(feature = "mpi")]
pub use mpi_backend::Mpi;
#[cfg(feature = "nccl")]
mod nccl_backend;
#[cfg(feature = "nccl")]
pub use nccl_backend::Nccl;

/// Errors of the collective layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Env(String),
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Which launcher started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher: one process.
    None,
    /// torchrun (or any launcher that sets PyTorch's `RANK`/`WORLD_SIZE`).
    Torchrun,
    /// OpenMPI's mpirun / mpiexec.
    OpenMpi,
    /// Slurm's srun.
    Slurm,
}

/// Who this process is in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// The rank among the processes of this machine (picks the GPU).
    pub local_rank: usize,
    pub launcher: Launcher,
    /// `MASTER_ADDR:MASTER_PORT` when set (torchrun; a rendezvous for NCCL).
    pub master: Option<String>,
}

impl DistEnv {
    /// One process.
    pub fn solo() -> DistEnv {
        DistEnv {
            rank: 0,
            world: 1,
            local_rank: 0,
            launcher: Launcher::None,
            master: None,
        }
    }

    /// Read the process's environment (see [`DistEnv::from_vars`]).
    pub fn detect() -> Result<DistEnv> {
        DistEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// Read the launcher's variables through `var`, in this order: torchrun's (`RANK`,
    /// `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), OpenMPI's
    /// (`OMPI_COMM_WORLD_RANK`, `_SIZE`, `_LOCAL_RANK`), srun's (`SLURM_PROCID`,
    /// `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`); none of them: one process. A variable that is set but
    /// not a number, or a rank outside the world, is an error that names it.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<DistEnv> {
        let num = |name: &str| -> Result<Option<usize>> {
            match var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    Error::Env(format!(
                        "the environment variable {name}=`{v}` is not a non-negative integer"
                    ))
                }),
            }
        };
        let sets: [(Launcher, [&str; 3]); 3] = [
            (Launcher::Torchrun, ["RANK", "WORLD_SIZE", "LOCAL_RANK"]),
            (
                Launcher::OpenMpi,
                [
                    "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK",
                ],
            ),
            // SLURM_STEP_NUM_TASKS: set by srun for its tasks, not in a batch script's own shell
            // (where SLURM_PROCID and SLURM_NTASKS are set too).
            (
                Launcher::Slurm,
                ["SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"],
            ),
        ];
        for (launcher, [r, w, l]) in sets {
            let (Some(rank), Some(world)) = (num(r)?, num(w)?) else {
                continue;
            };
            if world == 0 || rank >= world {
                return Err(Error::Env(format!(
                    "{r}={rank} does not fit {w}={world} (ranks are 0..{w}-1)"
                )));
            }
            let local_rank = num(l)?.unwrap_or(0);
            let master = match (var("MASTER_ADDR"), var("MASTER_PORT")) {
                (Some(a), Some(p)) => Some(format!("{a}:{p}")),
                _ => None,
            };
            return Ok(DistEnv {
                rank,
                world,
                local_rank,
                launcher,
                master,
            });
        }
        Ok(DistEnv::solo())
    }
}

/// What the engine needs of a communication library, on tensors. Implementations: [`Solo`]
/// and, with the `mpi` feature, `Mpi`. Every rank must call the same collectives in the same
/// order with tensors of the same kind and layout (the engine's step guarantees it).
pub trait Collective: Debug {
    /// The backend's name (`solo`, `mpi`).
    fn name(&self) -> &'static str;
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    fn local_rank(&self) -> usize;
    /// The element-wise sum over ranks of a contiguous 1-D tensor of kind Float, Double or
    /// Int64 (a new tensor on the input's device).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// The concatenation over ranks, in rank order, of 1-D tensors; `counts[r]` is rank `r`'s
    /// element count. Kinds: Float, Double, Int64, Uint8.
    fn all_gather(&self, t: &Tensor, counts: &[i64]) -> Result<Tensor>;
    /// Rank `root`'s copy of a 1-D tensor (same kind and length on every rank).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    fn barrier(&self) -> Result<()>;
    /// End the whole job with `code` (every rank), now: what a rank that failed calls, so that
    /// the others never wait for it.
    fn abort(&self, code: i32) -> !;
}

/// One process: every collective is the identity.
#[derive(Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn name(&self) -> &'static str {
        "solo"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.copy())
    }
    fn all_gather(&self, t: &Tensor, _counts: &[i64]) -> Result<Tensor> {
        Ok(t.copy())
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.copy())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The collective this process's launcher asks for: [`Solo`] when it runs alone, MPI when it
/// was started by mpirun (or srun with an MPI library) and the `mpi` feature is built. A
/// multi-process launch without a backend for it is an error that says how to build one.
pub fn connect(env: &DistEnv) -> Result<Box<dyn Collective>> {
    if env.world == 1 {
        return Ok(Box::new(Solo));
    }
    // torchrun's launches (or any with MTKD_DIST_BACKEND=nccl) meet over NCCL.
    #[cfg(feature = "nccl")]
    {
        let wants = std::env::var("MTKD_DIST_BACKEND").ok();
        if wants.as_deref() == Some("nccl")
            || (env.launcher == Launcher::Torchrun && wants.as_deref() != Some("mpi"))
        {
            let timeout = std::env::var("MTKD_DIST_TIMEOUT")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(600);
            return Ok(Box::new(Nccl::init(env, timeout)?));
        }
    }
    #[cfg(feature = "mpi")]
    {
        if env.launcher != Launcher::Torchrun {
            let m = Mpi::init()?;
            if m.world() != env.world || m.rank() != env.rank {
                return Err(Error::Env(format!(
                    "the launcher says rank {} of {}, MPI says rank {} of {}",
                    env.rank,
                    env.world,
                    m.rank(),
                    m.world()
                )));
            }
            return Ok(Box::new(m));
        }
    }
    Err(Error::Env(format!(
        "this process was started as rank {} of {} by {:?}, but this mtkd has no collective \
         backend for it: build with `--features mpi` and launch with mpirun (or srun --mpi), \
         e.g. `cargo xtask train --nproc {}` (README, \"Several processes\"), or, for torchrun \
         on GPUs, with `--features nccl`",
        env.rank, env.world, env.launcher, env.world
    )))
}

/// The contiguous part of a batch of `len` samples that rank `rank` of `world` takes: the
/// first `len % world` ranks take one more. Concatenated in rank order the parts are the batch
/// in its order, so gathered rows need no reordering.
pub fn shard(len: usize, rank: usize, world: usize) -> Range<usize> {
    let base = len / world;
    let extra = len % world;
    let start = rank * base + rank.min(extra);
    let n = base + usize::from(rank < extra);
    start..start + n
}

/// The rows of every rank's part of a batch of `len` samples ([`shard`]).
pub fn shard_sizes(len: usize, world: usize) -> Vec<i64> {
    (0..world)
        .map(|r| shard(len, r, world).len() as i64)
        .collect()
}

/// Gradient buckets hold at most this many bytes (PyTorch DDP's default, 25 MiB).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Make the gradients the same on every rank: each rank's gradient is multiplied by `scale`
/// (its share of the global batch, `n_r / N`, so that ranks with fewer samples count less)
/// and the results are summed over ranks. With equal parts this is the mean of the ranks'
/// gradients, which for a loss that is a mean over the batch is the global batch's gradient.
/// The tensors go in buckets of at most [`BUCKET_BYTES`], grouped by kind and device, in the
/// order given (every rank must give the same list: undefined gradients are an error).
pub fn all_reduce_grads(c: &dyn Collective, grads: &[Tensor], scale: f64) -> Result<()> {
    if grads.iter().any(|g| !g.defined()) {
        return Err(Error::Invalid {
            what: "gradients".into(),
            reason: "a parameter has no gradient on this rank; every rank must send the same \
                     layout (fill missing gradients with zeros)"
                .into(),
        });
    }
    if c.world() == 1 && scale == 1.0 {
        return Ok(());
    }
    let mut start = 0;
    while start < grads.len() {
        let (kind, device) = (grads[start].kind(), grads[start].device());
        let mut end = start;
        let mut bytes = 0usize;
        while end < grads.len()
            && grads[end].kind() == kind
            && grads[end].device() == device
            && (end == start
                || bytes + grads[end].numel() * kind.elt_size_in_bytes() <= BUCKET_BYTES)
        {
            bytes += grads[end].numel() * kind.elt_size_in_bytes();
            end += 1;
        }
        let bucket = &grads[start..end];
        tch::no_grad(|| -> Result<()> {
            let flat: Vec<Tensor> = bucket.iter().map(|g| g.reshape([-1])).collect();
            let flat = Tensor::f_cat(&flat, 0)?;
            let flat = if scale == 1.0 { flat } else { flat * scale };
            let sum = c.all_reduce_sum(&flat)?;
            let mut offset = 0i64;
            for g in bucket {
                let n = g.numel() as i64;
                let mut g = g.shallow_clone();
                g.f_copy_(&sum.f_narrow(0, offset, n)?.f_view_as(&g)?)?;
                offset += n;
            }
            Ok(())
        })?;
        start = end;
    }
    Ok(())
}

/// Sum `values` over ranks, in place (statistics: counts, loss sums, flags).
pub fn all_reduce_f64(c: &dyn Collective, values: &mut [f64]) -> Result<()> {
    if c.world() == 1 || values.is_empty() {
        return Ok(());
    }
    let t = c.all_reduce_sum(&Tensor::from_slice(values))?;
    let v = Vec::<f64>::try_from(&t)?;
    values.copy_from_slice(&v);
    Ok(())
}

/// The rows of every rank's `t` (`[n_r, ...]`, any kind, same trailing shape), concatenated in
/// rank order: with the parts of [`shard`], the global batch's rows in its order.
/// `rows[r]` is rank `r`'s row count. Bool, Half and BFloat16 travel as Uint8 and Float and
/// come back in their kind; the result is on `t`'s device.
pub fn all_gather_rows(c: &dyn Collective, t: &Tensor, rows: &[i64]) -> Result<Tensor> {
    if c.world() == 1 {
        return Ok(t.shallow_clone());
    }
    let size = t.size();
    if size.is_empty() {
        return Err(Error::Invalid {
            what: "all_gather_rows".into(),
            reason: "a scalar has no rows".into(),
        });
    }
    let per_row: i64 = size[1..].iter().product();
    let kind = t.kind();
    let wire = match kind {
        Kind::Bool => Kind::Uint8,
        Kind::Half | Kind::BFloat16 => Kind::Float,
        Kind::Int | Kind::Int16 | Kind::Int8 => Kind::Int64,
        k => k,
    };
    let flat = t.f_to_kind(wire)?.f_contiguous()?.f_reshape([-1])?;
    let counts: Vec<i64> = rows.iter().map(|r| r * per_row).collect();
    let all = c.all_gather(&flat, &counts)?;
    let total: i64 = rows.iter().sum();
    let mut shape = vec![total];
    shape.extend_from_slice(&size[1..]);
    Ok(all.f_reshape(shape.as_slice())?.f_to_kind(kind)?)
}

/// Give every rank rank 0's values of `tensors` (copied in place; the same list on every rank).
pub fn broadcast_tensors(c: &dyn Collective, tensors: &[Tensor]) -> Result<()> {
    if c.world() == 1 {
        return Ok(());
    }
    tch::no_grad(|| -> Result<()> {
        for t in tensors {
            let flat = t.f_contiguous()?.f_reshape([-1])?;
            let wire = match flat.kind() {
                Kind::Bool => Kind::Uint8,
                Kind::Half | Kind::BFloat16 => Kind::Float,
                k => k,
            };
            let got = c.broadcast(&flat.f_to_kind(wire)?, 0)?;
            let mut t = t.shallow_clone();
            t.f_copy_(&got.f_to_kind(t.kind())?.f_view_as(&t)?)?;
        }
        Ok(())
    })
}

/// Give every rank rank 0's string (a run folder's path).
pub fn broadcast_string(c: &dyn Collective, s: &str) -> Result<String> {
    if c.world() == 1 {
        return Ok(s.to_owned());
    }
    let len = c.broadcast(&Tensor::from_slice(&[s.len() as i64]), 0)?;
    let len = len.f_int64_value(&[0])? as usize;
    let mut bytes = s.as_bytes().to_vec();
    bytes.resize(len, 0);
    let got = c.broadcast(&Tensor::from_slice(&bytes), 0)?;
    let got = Vec::<u8>::try_from(&got)?;
    String::from_utf8(got).map_err(|_| Error::Invalid {
        what: "broadcast string".into(),
        reason: "not UTF-8".into(),
    })
}

/// A checksum of tensors' values: the sum, and the sum weighted by position, in f64 (equal
/// on ranks whose tensors are bitwise equal; a drift of one element changes it).
pub fn checksum(tensors: &[Tensor]) -> Result<[f64; 2]> {
    let mut out = [0.0f64; 2];
    tch::no_grad(|| -> Result<()> {
        for (i, t) in tensors.iter().enumerate() {
            if !t.defined() || t.numel() == 0 {
                continue;
            }
            let d = t
                .f_to_device(Device::Cpu)?
                .f_to_kind(Kind::Double)?
                .f_reshape([-1])?;
            let n = d.size()[0];
            let pos = Tensor::f_arange(n, (Kind::Double, Device::Cpu))? * 1e-6 + (i + 1) as f64;
            out[0] += d.f_sum(Kind::Double)?.f_double_value(&[])?;
            out[1] += (&d * pos).f_sum(Kind::Double)?.f_double_value(&[])?;
        }
        Ok(())
    })?;
    Ok(out)
}

/// Check that `tensors` hold the same values on every rank (their [`checksum`] equals rank
/// 0's); `what` names them in the error, which gives each rank's checksum.
pub fn check_same(c: &dyn Collective, what: &str, tensors: &[Tensor]) -> Result<()> {
    if c.world() == 1 {
        return Ok(());
    }
    let mine = checksum(tensors)?;
    let all = c.all_gather(&Tensor::from_slice(&mine), &vec![2; c.world()])?;
    let all = Vec::<f64>::try_from(&all)?;
    let differ: Vec<usize> = (1..c.world())
        .filter(|&r| {
            all[2 * r].to_bits() != all[0].to_bits() || all[2 * r + 1].to_bits() != all[1].to_bits()
        })
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    let sums: Vec<String> = (0..c.world())
        .map(|r| format!("rank {r}: {:e}/{:e}", all[2 * r], all[2 * r + 1]))
        .collect();
    Err(Error::Invalid {
        what: what.into(),
        reason: format!(
            "drifted apart between ranks (rank(s) {differ:?} differ from rank 0; checksums {}). \
             The ranks no longer train the same model: a collective was skipped or a rank \
             computed something only it sees",
            sums.join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn launchers_are_read_in_order() {
        assert_eq!(env(&[]).unwrap(), DistEnv::solo());
        let t = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!(
            (t.rank, t.world, t.local_rank, t.launcher),
            (3, 8, 1, Launcher::Torchrun)
        );
        assert_eq!(t.master.as_deref(), Some("node0:29500"));
        let o = env(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "6"),
        ])
        .unwrap();
        assert_eq!(
            (o.rank, o.world, o.local_rank, o.launcher),
            (1, 2, 1, Launcher::OpenMpi)
        );
        let s = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "6"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap();
        assert_eq!(
            (s.rank, s.world, s.local_rank, s.launcher),
            (5, 6, 1, Launcher::Slurm)
        );
        // A batch script's own shell is one process, whatever the allocation's task count.
        let batch = env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")]).unwrap();
        assert_eq!(batch, DistEnv::solo());
    }

    #[test]
    fn bad_launcher_variables_are_named() {
        let e = env(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.to_string().contains("RANK=`x`"), "{e}");
        let e = env(&[("RANK", "2"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(
            e.to_string().contains("RANK=2 does not fit WORLD_SIZE=2"),
            "{e}"
        );
    }

    #[test]
    fn shards_partition_a_batch_in_order() {
        for len in 0..20 {
            for world in 1..5 {
                let parts: Vec<Range<usize>> = (0..world).map(|r| shard(len, r, world)).collect();
                let flat: Vec<usize> = parts.iter().flat_map(|p| p.clone()).collect();
                assert_eq!(
                    flat,
                    (0..len).collect::<Vec<_>>(),
                    "len {len} world {world}"
                );
                let sizes: Vec<usize> = parts.iter().map(|p| p.len()).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
                assert_eq!(
                    shard_sizes(len, world),
                    sizes.iter().map(|&s| s as i64).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn solo_leaves_gradients_and_rows_alone_and_scales_when_asked() {
        let g = vec![
            Tensor::from_slice(&[1.0f32, 2.0]),
            Tensor::from_slice(&[3.0f32]).view([1, 1]),
        ];
        all_reduce_grads(&Solo, &g, 1.0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&g[0]).unwrap(), vec![1.0, 2.0]);
        all_reduce_grads(&Solo, &g, 0.5).unwrap();
        assert_eq!(Vec::<f32>::try_from(&g[0]).unwrap(), vec![0.5, 1.0]);
        assert_eq!(
            Vec::<f32>::try_from(&g[1].reshape([-1])).unwrap(),
            vec![1.5]
        );
        let undefined = vec![Tensor::new()];
        assert!(all_reduce_grads(&Solo, &undefined, 1.0).is_err());
        let rows = Tensor::from_slice(&[true, false]);
        let got = all_gather_rows(&Solo, &rows, &[2]).unwrap();
        assert_eq!(Vec::<bool>::try_from(&got).unwrap(), vec![true, false]);
    }

    #[test]
    fn checksums_see_one_changed_element_and_a_swap() {
        let a = vec![Tensor::from_slice(&[1.0f32, 2.0, 3.0])];
        let b = vec![Tensor::from_slice(&[1.0f32, 2.0, 3.5])];
        let swapped = vec![Tensor::from_slice(&[2.0f32, 1.0, 3.0])];
        let ca = checksum(&a).unwrap();
        assert_eq!(ca, checksum(&a).unwrap());
        assert_ne!(ca, checksum(&b).unwrap());
        assert_ne!(ca, checksum(&swapped).unwrap());
    }
}
