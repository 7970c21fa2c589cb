//! The NCCL backend on a GPU (cargo feature `nccl`). Ignored without one: run them with
//! `cargo test --release -p mtkd-dist --features nccl --test nccl -- --ignored` on a machine
//! with a CUDA GPU (README, "Several processes"). One GPU holds one rank (NCCL refuses two ranks
//! on one device), so these run a world of one: every collective must be the identity, through
//! a real `ProcessGroupNCCL` and its TCPStore rendezvous.
#![cfg(feature = "nccl")]

use mtkd_dist::{
    all_gather_rows, all_reduce_f64, all_reduce_grads, broadcast_tensors, Collective, DistEnv, Nccl,
};
use tch::{Device, Kind, Tensor};

fn world_of_one() -> Nccl {
    assert!(
        tch::Cuda::is_available(),
        "these tests need a CUDA GPU (they are ignored by default)"
    );
    // A free port for the rendezvous.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = DistEnv {
        rank: 0,
        world: 1,
        local_rank: 0,
        launcher: mtkd_dist::Launcher::Torchrun,
        master: Some(format!("127.0.0.1:{port}")),
    };
    Nccl::init(&env, 60).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_world_of_one_over_nccl_is_the_identity() {
    let c = world_of_one();
    assert_eq!((c.rank(), c.world(), c.name()), (0, 1, "nccl"));
    let cuda = Device::Cuda(0);
    let t = Tensor::arange(10, (Kind::Float, cuda));
    let s = c.all_reduce_sum(&t).unwrap();
    assert_eq!(s.device(), cuda);
    assert!(s.equal(&t));
    let g = c.all_gather(&t.narrow(0, 0, 3), &[3]).unwrap();
    assert!(g.equal(&t.narrow(0, 0, 3)));
    let b = c.broadcast(&t, 0).unwrap();
    assert!(b.equal(&t));
    c.barrier().unwrap();
    // The helpers: some short-cut a world of one, all_reduce_grads at a scale other than 1
    // does not.
    let grads = vec![
        Tensor::ones([5], (Kind::Float, cuda)),
        Tensor::ones([2, 2], (Kind::Float, cuda)),
    ];
    all_reduce_grads(&c, &grads, 0.5).unwrap();
    assert_eq!(grads[1].sum(Kind::Double).double_value(&[]), 2.0);
    let mut v = [1.5, 2.0];
    all_reduce_f64(&c, &mut v).unwrap();
    assert_eq!(v, [1.5, 2.0]);
    let rows = Tensor::ones([3, 2], (Kind::BFloat16, cuda));
    assert!(all_gather_rows(&c, &rows, &[3]).unwrap().equal(&rows));
    broadcast_tensors(&c, &[t.shallow_clone()]).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn nccl_all_reduce_runs_the_real_collective_on_cuda_tensors() {
    let c = world_of_one();
    // all_reduce_grads short-cuts a world of one only at scale 1: at another scale the bucket
    // goes through ProcessGroupNCCL.
    let big = Tensor::full([(25 << 20) / 4 + 7], 3.0, (Kind::Float, Device::Cuda(0)));
    all_reduce_grads(&c, &[big.shallow_clone()], 0.25).unwrap();
    assert!(big.eq(0.75).all().int64_value(&[]) == 1);
}
