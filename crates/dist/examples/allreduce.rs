//! The all-reduce's cost on this machine, for the scaling report (`cargo xtask bench-dist`):
//! under `mpirun -n N`, times `all_reduce_grads` of f32 gradients from 4 KiB to 64 MiB and
//! prints one JSON line per size (rank 0): bytes, seconds per call (the median of the repeats)
//! and the bus bandwidth `2 (N - 1) / N * bytes / seconds` of a ring all-reduce.
//!
//! ```sh
//! cargo build --release -p mtkd-dist --features mpi --example allreduce
//! mpirun -n 2 --bind-to none target/release/examples/allreduce
//! ```

use std::time::Instant;

use mtkd_dist::{all_reduce_grads, connect, DistEnv};
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    tch::set_num_threads(1);
    let env = DistEnv::detect()?;
    let c = connect(&env)?;
    let world = c.world() as f64;
    for &bytes in &[4usize << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20] {
        let n = (bytes / 4) as i64;
        // A model's gradient list: 8 tensors of equal size.
        let grads: Vec<Tensor> = (0..8)
            .map(|_| Tensor::ones([n / 8], (Kind::Float, Device::Cpu)))
            .collect();
        let repeats = if bytes <= 1 << 20 { 50 } else { 8 };
        let mut times = Vec::with_capacity(repeats);
        all_reduce_grads(c.as_ref(), &grads, 0.5)?; // warm-up
        for _ in 0..repeats {
            c.barrier()?;
            let t = Instant::now();
            all_reduce_grads(c.as_ref(), &grads, 0.5)?;
            times.push(t.elapsed().as_secs_f64());
        }
        // The slowest rank decides: take each repeat's maximum over ranks.
        let t = Tensor::from_slice(&times);
        let all = c.all_gather(&t, &vec![repeats as i64; c.world()])?;
        let per = all.view([c.world() as i64, repeats as i64]).amax(0, false);
        let mut v = Vec::<f64>::try_from(&per)?;
        v.sort_by(f64::total_cmp);
        let median = v[v.len() / 2];
        if c.rank() == 0 {
            let bus = if c.world() > 1 {
                2.0 * (world - 1.0) / world * bytes as f64 / median
            } else {
                f64::INFINITY
            };
            println!(
                "{{\"ranks\": {}, \"backend\": \"{}\", \"bytes\": {bytes}, \"seconds\": {median:e}, \"bus_bytes_per_second\": {}}}",
                c.world(),
                c.name(),
                if bus.is_finite() { format!("{bus:e}") } else { "null".into() }
            );
        }
    }
    c.barrier()?;
    Ok(())
}
