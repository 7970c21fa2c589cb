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

fn host(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_to_device(Device::Cpu)?
        .f_contiguous()?
        .f_reshape([-1])?)
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
        let h = host(t)?;
        let out = match h.kind() {
            Kind::Float => {
                let v = Vec::<f32>::try_from(&h)?;
                let mut r = vec![0f32; v.len()];
                self.world
                    .all_reduce_into(&v[..], &mut r[..], SystemOperation::sum());
                Tensor::from_slice(&r)
            }
            Kind::Double => {
                let v = Vec::<f64>::try_from(&h)?;
                let mut r = vec![0f64; v.len()];
                self.world
                    .all_reduce_into(&v[..], &mut r[..], SystemOperation::sum());
                Tensor::from_slice(&r)
            }
            Kind::Int64 => {
                let v = Vec::<i64>::try_from(&h)?;
                let mut r = vec![0i64; v.len()];
                self.world
                    .all_reduce_into(&v[..], &mut r[..], SystemOperation::sum());
                Tensor::from_slice(&r)
            }
            k => return Err(unsupported("all-reduce", k)),
        };
        Ok(out.f_to_device(t.device())?)
    }

    fn all_gather(&self, t: &Tensor, counts: &[i64]) -> Result<Tensor> {
        if counts.len() != self.world() {
            return Err(Error::Invalid {
                what: "MPI all-gather".into(),
                reason: format!("{} counts for {} ranks", counts.len(), self.world()),
            });
        }
        let h = host(t)?;
        if h.size()[0] != counts[self.rank()] {
            return Err(Error::Invalid {
                what: "MPI all-gather".into(),
                reason: format!(
                    "rank {} holds {} elements, its count says {}",
                    self.rank(),
                    h.size()[0],
                    counts[self.rank()]
                ),
            });
        }
        let c32: Vec<i32> = counts.iter().map(|&c| c as i32).collect();
        let out = match h.kind() {
            Kind::Float => Tensor::from_slice(&self.gather_vec(&Vec::<f32>::try_from(&h)?, &c32)),
            Kind::Double => Tensor::from_slice(&self.gather_vec(&Vec::<f64>::try_from(&h)?, &c32)),
            Kind::Int64 => Tensor::from_slice(&self.gather_vec(&Vec::<i64>::try_from(&h)?, &c32)),
            Kind::Uint8 => Tensor::from_slice(&self.gather_vec(&Vec::<u8>::try_from(&h)?, &c32)),
            k => return Err(unsupported("all-gather", k)),
        };
        Ok(out.f_to_device(t.device())?)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let h = host(t)?;
        let root = self.world.process_at_rank(root as i32);
        let out = match h.kind() {
            Kind::Float => {
                let mut v = Vec::<f32>::try_from(&h)?;
                root.broadcast_into(&mut v[..]);
                Tensor::from_slice(&v)
            }
            Kind::Double => {
                let mut v = Vec::<f64>::try_from(&h)?;
                root.broadcast_into(&mut v[..]);
                Tensor::from_slice(&v)
            }
            Kind::Int64 => {
                let mut v = Vec::<i64>::try_from(&h)?;
                root.broadcast_into(&mut v[..]);
                Tensor::from_slice(&v)
            }
            Kind::Uint8 => {
                let mut v = Vec::<u8>::try_from(&h)?;
                root.broadcast_into(&mut v[..]);
                Tensor::from_slice(&v)
            }
            k => return Err(unsupported("broadcast", k)),
        };
        Ok(out.f_to_device(t.device())?)
    }

    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
