//! The MPI collectives between two local processes. Each `#[test]` here launches
//! `mpirun -n 2` on this same test binary in worker mode (`MTKD_MPI_WORKER=1`, the worker test
//! selected by name), with loopback-only transports, under a time limit.
#![cfg(feature = "mpi")]

use std::time::Duration;

use mtkd_dist::{
    all_gather_rows, all_reduce_f64, all_reduce_grads, broadcast_string, broadcast_tensors,
    check_same, shard, shard_sizes, Collective, Mpi,
};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const LIMIT: Duration = Duration::from_secs(120);

#[path = "../../../test-support/mpirun.rs"]
mod mpirun;

/// Run `worker` (a test of this file) on two ranks in worker mode; returns (success, output),
/// failing the test on a hang.
fn launch(worker: &str) -> (bool, String) {
    let exe = std::env::current_exe().unwrap();
    let (code, out) = mpirun::wait(
        mpirun::spawn(
            mpirun::mpirun(2)
                .arg(exe)
                .args([
                    "--exact",
                    worker,
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("MTKD_MPI_WORKER", "1"),
        ),
        LIMIT,
        &format!("mpirun {worker}"),
    );
    (code == Some(0), out)
}

fn worker() -> Option<Mpi> {
    if std::env::var("MTKD_MPI_WORKER").is_err() {
        return None;
    }
    tch::set_num_threads(1);
    Some(Mpi::init().expect("MPI init"))
}

#[test]
fn collectives_on_two_ranks() {
    let (ok, out) = launch("worker_collectives");
    assert!(ok, "{out}");
    assert_eq!(out.matches("collectives ok").count(), 2, "{out}");
}

#[test]
#[ignore = "run by collectives_on_two_ranks under mpirun"]
fn worker_collectives() {
    let Some(c) = worker() else { return };
    let r = c.rank() as f64;
    assert_eq!(c.world(), 2);
    // Gradients across a bucket edge: 25 MiB of f32 plus a little, and a Double gradient
    // (its own bucket), each rank's scaled by its share.
    let big = Tensor::full([(25 << 20) / 4 + 3], r + 1.0, (Kind::Float, Device::Cpu));
    let small = Tensor::full([2, 3], 10.0 * (r + 1.0), (Kind::Float, Device::Cpu));
    let dbl = Tensor::full([5], r, (Kind::Double, Device::Cpu));
    let share = if r == 0.0 { 0.75 } else { 0.25 };
    all_reduce_grads(
        &c,
        &[
            big.shallow_clone(),
            small.shallow_clone(),
            dbl.shallow_clone(),
        ],
        share,
    )
    .unwrap();
    // 1 * 0.75 + 2 * 0.25 = 1.25; 10 * 0.75 + 20 * 0.25 = 12.5; 0 * 0.75 + 1 * 0.25.
    assert!(big.eq(1.25).all().int64_value(&[]) == 1);
    assert!(small.eq(12.5).all().int64_value(&[]) == 1);
    assert!(dbl.eq(0.25).all().int64_value(&[]) == 1);
    let mut stats = [r, 1.0, 1e300];
    all_reduce_f64(&c, &mut stats).unwrap();
    assert_eq!(stats, [1.0, 2.0, 2e300]);
    // Rows of unequal parts (3 + 2 of a batch of 5), bool and bf16 included, in batch order.
    let sizes = shard_sizes(5, 2);
    let part = shard(5, c.rank(), 2);
    let rows = Tensor::arange_start(
        part.start as i64,
        part.end as i64,
        (Kind::Int64, Device::Cpu),
    )
    .view([-1, 1])
    .repeat([1, 2]);
    let got = all_gather_rows(&c, &rows, &sizes).unwrap();
    assert_eq!(got.size(), vec![5, 2]);
    assert_eq!(
        Vec::<i64>::try_from(&got.select(1, 1)).unwrap(),
        vec![0, 1, 2, 3, 4]
    );
    let flags = Tensor::from_slice(&vec![c.rank() == 1; part.len()]);
    let got = all_gather_rows(&c, &flags, &sizes).unwrap();
    assert_eq!(
        Vec::<bool>::try_from(&got).unwrap(),
        vec![false, false, false, true, true]
    );
    let half = Tensor::full(
        [part.len() as i64, 2],
        r + 0.5,
        (Kind::BFloat16, Device::Cpu),
    );
    let got = all_gather_rows(&c, &half, &sizes).unwrap();
    assert_eq!(got.kind(), Kind::BFloat16);
    assert_eq!(
        got.sum(Kind::Double).double_value(&[]),
        3.0 * 2.0 * 0.5 + 2.0 * 2.0 * 1.5
    );
    // Broadcast of rank 0's parameters and path; the drift check.
    let p = Tensor::full([4], r, (Kind::Float, Device::Cpu));
    let q = Tensor::full([2], r as i64, (Kind::Int64, Device::Cpu));
    assert!(check_same(&c, "parameters", &[p.shallow_clone()]).is_err());
    broadcast_tensors(&c, &[p.shallow_clone(), q.shallow_clone()]).unwrap();
    assert_eq!(p.sum(Kind::Double).double_value(&[]), 0.0);
    assert_eq!(q.sum(Kind::Int64).int64_value(&[]), 0);
    check_same(&c, "parameters", &[p.shallow_clone(), q]).unwrap();
    let path = broadcast_string(&c, if r == 0.0 { "runs/fmnist-001" } else { "other" }).unwrap();
    assert_eq!(path, "runs/fmnist-001");
    c.barrier().unwrap();
    println!("collectives ok");
}

#[test]
fn twenty_steps_on_two_ranks_match_one_process() {
    let (ok, out) = launch("worker_equivalence");
    assert!(ok, "{out}");
    assert_eq!(out.matches("equivalence ok").count(), 2, "{out}");
}

/// A BN-free CNN.
fn net(vs: &nn::Path) -> impl Module {
    nn::seq()
        .add(nn::conv2d(vs / "c1", 1, 4, 3, Default::default()))
        .add_fn(|x| x.relu())
        .add_fn(|x| x.flatten(1, -1))
        .add(nn::linear(vs / "fc", 4 * 6 * 6, 3, Default::default()))
}

#[test]
#[ignore = "run by twenty_steps_on_two_ranks_match_one_process under mpirun"]
fn worker_equivalence() {
    let Some(c) = worker() else { return };
    // Global batch 8: one process takes all 8 rows, each rank its 4; SGD with momentum, weight
    // decay and gradient clipping (after the all-reduce, the same norm on every rank).
    let build = || {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let m = net(&vs.root());
        let opt = nn::Sgd {
            momentum: 0.9,
            dampening: 0.0,
            wd: 5e-4,
            nesterov: true,
        }
        .build(&vs, 0.05)
        .unwrap();
        (vs, m, opt)
    };
    let (vs1, m1, mut opt1) = build();
    let (vs2, m2, mut opt2) = build();
    // The sorted variables: the same list on every rank.
    let sorted = |vs: &nn::VarStore| {
        let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, t)| t).collect::<Vec<_>>()
    };
    broadcast_tensors(&c, &sorted(&vs2)).unwrap();
    let part = shard(8, c.rank(), 2);
    for step in 0..20 {
        tch::manual_seed(100 + step);
        let x = Tensor::randn([8, 1, 8, 8], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(3, [8], (Kind::Int64, Device::Cpu));
        opt1.zero_grad();
        m1.forward(&x).cross_entropy_for_logits(&y).backward();
        opt1.clip_grad_norm(1.0);
        opt1.step();
        let (xs, ys) = (
            x.narrow(0, part.start as i64, part.len() as i64),
            y.narrow(0, part.start as i64, part.len() as i64),
        );
        opt2.zero_grad();
        m2.forward(&xs).cross_entropy_for_logits(&ys).backward();
        let grads: Vec<Tensor> = sorted(&vs2).iter().map(|t| t.grad()).collect();
        all_reduce_grads(&c, &grads, part.len() as f64 / 8.0).unwrap();
        opt2.clip_grad_norm(1.0);
        opt2.step();
    }
    for (a, b) in sorted(&vs1).iter().zip(sorted(&vs2)) {
        let diff = (a - &b).abs().max().double_value(&[]);
        let scale = a.abs().max().double_value(&[]);
        assert!(
            a.allclose(&b, 1e-5, 1e-6, false),
            "after 20 steps the data-parallel parameters differ by {diff} (scale {scale})"
        );
    }
    check_same(&c, "parameters", &sorted(&vs2)).unwrap();
    println!("equivalence ok");
}

#[test]
fn a_rank_that_fails_ends_the_job() {
    let (ok, out) = launch("worker_failure");
    assert!(!ok, "the job should fail: {out}");
    assert!(out.contains("rank 1 gives up"), "{out}");
}

#[test]
#[ignore = "run by a_rank_that_fails_ends_the_job under mpirun"]
fn worker_failure() {
    let Some(c) = worker() else { return };
    if c.rank() == 1 {
        eprintln!("rank 1 gives up");
        c.abort(7);
    }
    // Rank 0 waits in a collective that rank 1 never joins: only the abort ends it.
    c.barrier().unwrap();
    let _ = all_reduce_f64(&c, &mut [1.0]);
    std::thread::sleep(Duration::from_secs(300));
}
