//! [`Collective`] over MPI (the `mpi` crate over the system's OpenMPI or MPICH). Tensors are
//! copied to host vectors for the call and back to their device (correct on CUDA, but staged
//! through host memory: NCCL is the GPU backend).

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use tch::{Device, Kind, Tensor};

use crate::{Collective, Error, Result};

/// MPI's world communicator; finalises MPI when dropped.
pub struct Mpi {
    // Dropped before the universe (declaration order), which finalises MPI.
    world: SimpleCommunicator,
    _universe: Universe,
    local_rank: usize,
}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("rank", &self.world.rank())
            .field("world", &self.world.size())
            .finish()
    }
}

impl Mpi {
    /// Initialise MPI (once per process).
    pub fn init() -> Result<Mpi> {
        let universe = mpi::initialize().ok_or_else(|| {
            Error::Env("MPI could not be initialised (was it initialised already?)".into())
        })?;
        let world = universe.world();
        let local_rank = std::env::var("OMPI_COMM_WORLD_LOCAL_RANK")
            .or_else(|_| std::env::var("MPI_LOCALRANKID"))
            .or_else(|_| std::env::var("SLURM_LOCALID"))
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        tracing::info!(
            rank = world.rank(),
            world = world.size(),
            local_rank,
            library = %mpi::environment::library_version().unwrap_or_default().lines().next().unwrap_or(""),
            "MPI initialised"
        );
        Ok(Mpi {
            world,
            _universe: universe,
            local_rank,
        })
    }
}

fn unsupported(op: &str, kind: Kind) -> Error {
    Error::Invalid {
        what: format!("MPI {op}"),
        reason: format!("tensors of kind {kind:?} are not supported"),
    }
}

/// `f` on `t`'s values as a host vector of its element type; the result back on `t`'s device.
fn on_host<T>(t: &Tensor, f: impl FnOnce(Vec<T>) -> Vec<T>) -> Result<Tensor>
where
    T: tch::kind::Element + Equivalence,
{
    let h = t
        .f_to_device(Device::Cpu)?
        .f_contiguous()?
        .f_reshape([-1])?;
    let mut values = vec![T::ZERO; h.numel()];
    h.f_copy_data(&mut values, h.numel())?;
    let out = f(values);
    Ok(Tensor::from_slice(&out).f_to_device(t.device())?)
}

/// [`on_host`] with `$T` the element type of `$t`'s kind (Float, Double, Int64, Uint8); other
/// kinds are refused, naming the operation `$what`.
macro_rules! by_kind {
    ($what:expr, $t:expr, $T:ident, $f:expr) => {
        match $t.kind() {
            Kind::Float => {
                type $T = f32;
                on_host::<$T>($t, $f)
            }
            Kind::Double => {
                type $T = f64;
                on_host::<$T>($t, $f)
            }
            Kind::Int64 => {
                type $T = i64;
                on_host::<$T>($t, $f)
            }
            Kind::Uint8 => {
                type $T = u8;
                on_host::<$T>($t, $f)
            }
            k => Err(unsupported($what, k)),
        }
    };
}

fn displacements(counts: &[i32]) -> Vec<i32> {
    counts
        .iter()
        .scan(0i32, |acc, &c| {
            let d = *acc;
            *acc += c;
            Some(d)
        })
        .collect()
}

impl Mpi {
    fn gather_vec<T>(&self, mine: &[T], counts: &[i32]) -> Vec<T>
    where
        T: Equivalence + Default + Clone,
    {
        let total: i32 = counts.iter().sum();
        let displs = displacements(counts);
        let mut out = vec![T::default(); total as usize];
        {
            let mut part = PartitionMut::new(&mut out[..], counts, &displs[..]);
            self.world.all_gather_varcount_into(mine, &mut part);
        }
        out
    }
}

impl Collective for Mpi {
    fn name(&self) -> &'static str {
        "mpi"
    }
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world(&self) -> usize {
        self.world.size() as usize
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        by_kind!("all-reduce", t, T, |v: Vec<T>| {
            let mut r = vec![T::default(); v.len()];
            self.world
                .all_reduce_into(&v[..], &mut r[..], SystemOperation::sum());
            r
        })
    }

    fn all_gather(&self, t: &Tensor, counts: &[i64]) -> Result<Tensor> {
        if counts.len() != self.world() {
            return Err(Error::Invalid {
                what: "MPI all-gather".into(),
                reason: format!("{} counts for {} ranks", counts.len(), self.world()),
            });
        }
        if t.numel() as i64 != counts[self.rank()] {
            return Err(Error::Invalid {
                what: "MPI all-gather".into(),
                reason: format!(
                    "rank {} holds {} elements, its count says {}",
                    self.rank(),
                    t.numel(),
                    counts[self.rank()]
                ),
            });
        }
        let c32: Vec<i32> = counts.iter().map(|&c| c as i32).collect();
        by_kind!("all-gather", t, T, |v: Vec<T>| self.gather_vec(&v, &c32))
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let root = self.world.process_at_rank(root as i32);
        by_kind!("broadcast", t, T, |mut v: Vec<T>| {
            root.broadcast_into(&mut v[..]);
            v
        })
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
