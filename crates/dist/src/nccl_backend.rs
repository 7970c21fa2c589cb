//! [`Collective`] over NCCL (cargo feature `nccl`): libtorch's own `c10d::ProcessGroupNCCL`
//! over a `c10d::TCPStore` rendezvous at `MASTER_ADDR:MASTER_PORT`, through the C++ shim
//! `shim/nccl.cpp`. Tensors must be on this rank's CUDA device; every collective is waited for
//! before it returns (the current stream waits on NCCL's). NCCL's own timeouts and
//! `NCCL_*` / `TORCH_NCCL_*` settings apply.
//!
//! The only `unsafe` of the workspace: the calls into the shim, with tch's tensor handles
//! (`C_tensor` is a `torch::Tensor*`) and the shim's error strings.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use tch::{Device, Tensor};
use torch_sys::C_tensor;

use crate::{Collective, DistEnv, Error, Result};

extern "C" {
    fn mtkd_nccl_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        device: c_int,
        timeout_s: c_int,
        client_only: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn mtkd_nccl_delete(group: *mut c_void);
    fn mtkd_nccl_free_error(err: *mut c_char);
    fn mtkd_nccl_all_reduce_sum(
        group: *mut c_void,
        t: *mut C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mtkd_nccl_all_gather(
        group: *mut c_void,
        output: *mut C_tensor,
        input: *mut C_tensor,
        err: *mut *mut c_char,
    ) -> c_int;
    fn mtkd_nccl_broadcast(
        group: *mut c_void,
        t: *mut C_tensor,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
}

/// A NCCL process group of the job's ranks, one CUDA device each.
pub struct Nccl {
    group: *mut c_void,
    rank: usize,
    world: usize,
    local_rank: usize,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("local_rank", &self.local_rank)
            .finish()
    }
}

/// The shim's error string, freed.
fn take_error(what: &str, err: *mut c_char) -> Error {
    let reason = if err.is_null() {
        "failed (no message)".to_owned()
    } else {
        // SAFETY: a NUL-terminated string malloc'ed by the shim, freed once here.
        let s = unsafe { CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned();
        unsafe { mtkd_nccl_free_error(err) };
        s
    };
    Error::Invalid {
        what: format!("NCCL {what}"),
        reason,
    }
}

impl Nccl {
    /// Join the job that `env` describes: rank 0 hosts the rendezvous store at
    /// `MASTER_ADDR:MASTER_PORT` (unless torchrun's agent hosts it:
    /// `TORCHELASTIC_USE_AGENT_STORE=True`), every rank uses CUDA device `local_rank`.
    pub fn init(env: &DistEnv, timeout_s: u32) -> Result<Nccl> {
        let master = env.master.clone().ok_or_else(|| {
            Error::Env(
                "the NCCL backend needs MASTER_ADDR and MASTER_PORT (torchrun sets them)".into(),
            )
        })?;
        let (host, port) = master
            .rsplit_once(':')
            .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_owned(), p)))
            .ok_or_else(|| {
                Error::Env(format!(
                    "MASTER_ADDR:MASTER_PORT `{master}` is not host:port"
                ))
            })?;
        let count = tch::Cuda::device_count() as usize;
        if env.local_rank >= count {
            return Err(Error::Env(format!(
                "local rank {} needs CUDA device {}, but libtorch sees {count}",
                env.local_rank, env.local_rank
            )));
        }
        let client_only = std::env::var("TORCHELASTIC_USE_AGENT_STORE")
            .is_ok_and(|v| v.eq_ignore_ascii_case("true"));
        let c_host = CString::new(host.clone())
            .map_err(|_| Error::Env(format!("MASTER_ADDR `{host}` holds a NUL byte")))?;
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: valid C string and out-pointer; the shim catches every C++ exception.
        let group = unsafe {
            mtkd_nccl_new(
                c_host.as_ptr(),
                c_int::from(port),
                env.rank as c_int,
                env.world as c_int,
                env.local_rank as c_int,
                timeout_s as c_int,
                c_int::from(client_only),
                &mut err,
            )
        };
        if group.is_null() {
            return Err(take_error("process group", err));
        }
        tracing::info!(rank = env.rank, world = env.world, device = env.local_rank, %master, "NCCL process group ready");
        Ok(Nccl {
            group,
            rank: env.rank,
            world: env.world,
            local_rank: env.local_rank,
        })
    }

    fn device(&self) -> Device {
        Device::Cuda(self.local_rank)
    }

    /// `t` as a contiguous tensor on this rank's device (a copy, so that in-place collectives
    /// never touch the caller's tensor).
    fn staged(&self, t: &Tensor) -> Result<Tensor> {
        let on = t.f_to_device(self.device())?.f_reshape([-1])?;
        let mut out = Tensor::f_zeros_like(&on)?;
        out.f_copy_(&on)?;
        Ok(out)
    }

    fn check(&self, what: &str, rc: c_int, err: *mut c_char) -> Result<()> {
        if rc == 0 {
            Ok(())
        } else {
            Err(take_error(what, err))
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: created by mtkd_nccl_new, deleted once.
        unsafe { mtkd_nccl_delete(self.group) };
    }
}

impl Collective for Nccl {
    fn name(&self) -> &'static str {
        "nccl"
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let mut out = self.staged(t)?;
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: `out` lives across the call, which waits for the collective.
        let rc = unsafe { mtkd_nccl_all_reduce_sum(self.group, out.as_mut_ptr(), &mut err) };
        self.check("all-reduce", rc, err)?;
        Ok(out.f_to_device(t.device())?)
    }

    fn all_gather(&self, t: &Tensor, counts: &[i64]) -> Result<Tensor> {
        // NCCL gathers equal parts: pad every rank's to the largest, then cut.
        let max = counts.iter().copied().max().unwrap_or(0);
        let mine = self.staged(t)?;
        if counts.len() != self.world || mine.size()[0] != counts[self.rank] {
            return Err(Error::Invalid {
                what: "NCCL all-gather".into(),
                reason: format!(
                    "rank {} holds {} elements, the counts {counts:?} say otherwise",
                    self.rank,
                    mine.size()[0]
                ),
            });
        }
        let mut input = Tensor::f_zeros([max], (mine.kind(), self.device()))?;
        input.f_narrow(0, 0, mine.size()[0])?.f_copy_(&mine)?;
        let mut output = Tensor::f_zeros([max * self.world as i64], (mine.kind(), self.device()))?;
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: both tensors live across the call, which waits for the collective.
        let rc = unsafe {
            mtkd_nccl_all_gather(
                self.group,
                output.as_mut_ptr(),
                input.as_mut_ptr(),
                &mut err,
            )
        };
        self.check("all-gather", rc, err)?;
        let parts: Vec<Tensor> = counts
            .iter()
            .enumerate()
            .map(|(r, &c)| output.f_narrow(0, r as i64 * max, c))
            .collect::<std::result::Result<_, _>>()?;
        Ok(Tensor::f_cat(&parts, 0)?.f_to_device(t.device())?)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mut out = self.staged(t)?;
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: `out` lives across the call, which waits for the collective.
        let rc =
            unsafe { mtkd_nccl_broadcast(self.group, out.as_mut_ptr(), root as c_int, &mut err) };
        self.check("broadcast", rc, err)?;
        Ok(out.f_to_device(t.device())?)
    }

    fn barrier(&self) -> Result<()> {
        // A one-element all-reduce on this rank's device: c10d's own barrier guesses the device
        // from the rank when no collective has bound one yet.
        let one = Tensor::f_ones([1], (tch::Kind::Float, self.device()))?;
        self.all_reduce_sum(&one).map(|_| ())
    }

    fn abort(&self, code: i32) -> ! {
        // No destructors while NCCL's watchdog threads run: abort the process. torchrun stops
        // the other workers when one dies; under srun, NCCL's watchdog ends them after
        // MTKD_DIST_TIMEOUT.
        tracing::error!(code, "aborting the NCCL job");
        std::process::abort()
    }
}
