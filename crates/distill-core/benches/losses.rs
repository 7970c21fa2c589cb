//! Criterion benchmarks of the per-step distillation maths: losses, signals and weighting
//! strategies for a batch of 64, 10 and 100 classes, three teachers.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::baselines::{Aekd, Ebkd};
use mtkd_distill_core::mmkd::{Mmkd, MmkdConfig};
use mtkd_distill_core::signals::{BatchSignals, StudentHead};
use mtkd_distill_core::weighting::{Equal, WeightingStrategy};
use mtkd_distill_core::{loss, ModelOutput};

fn inputs(b: i64, k: i64, m: usize) -> (Tensor, Vec<ModelOutput>, Vec<Option<Tensor>>, Tensor) {
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let student = Tensor::randn([b, k], opts);
    let teachers = (0..m)
        .map(|_| ModelOutput {
            logits: Tensor::randn([b, k], opts),
            features: Some(Tensor::randn([b, 64, 8, 8], opts)),
        })
        .collect();
    let projected = (0..m)
        .map(|_| Some(Tensor::randn([b, 64, 8, 8], opts)))
        .collect();
    let labels = Tensor::randint(k, [b], (Kind::Int64, Device::Cpu));
    (student, teachers, projected, labels)
}

fn bench(c: &mut Criterion) {
    tch::set_num_threads(1);
    let mut g = c.benchmark_group("distill-core");
    for k in [10i64, 100] {
        let (s, t, p, y) = inputs(64, k, 3);
        g.bench_with_input(BenchmarkId::new("kd_kl", k), &k, |bch, _| {
            bch.iter(|| loss::kd_kl(&s, &t[0].logits, 4.0).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("signals", k), &k, |bch, _| {
            bch.iter(|| BatchSignals::compute(&s, &p, &t, &y, 4.0).unwrap())
        });
        let sig = BatchSignals::compute(&s, &p, &t, &y, 4.0).unwrap();
        g.bench_with_input(BenchmarkId::new("equal", k), &k, |bch, _| {
            bch.iter(|| Equal.weights(&sig).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("ebkd", k), &k, |bch, _| {
            bch.iter(|| Ebkd.weights(&sig).unwrap())
        });
        let mut aekd = Aekd::new(0.6);
        g.bench_with_input(BenchmarkId::new("aekd", k), &k, |bch, _| {
            bch.iter(|| aekd.weights(&sig).unwrap())
        });
        // MMKD with a 64-wide embedding: weights plus one meta-update per call (every = 1).
        let mut sig = BatchSignals::compute(&s, &p, &t, &y, 4.0).unwrap();
        let opts = (Kind::Float, Device::Cpu);
        sig.student_head = Some(StudentHead {
            embedding: Tensor::randn([64, 64], opts),
            weight: Tensor::randn([k, 64], opts) * 0.1,
            bias: Some(Tensor::zeros([k], opts)),
            lr: 0.05,
            pixel_embedding: None,
        });
        let mut mmkd = Mmkd::new(MmkdConfig::default(), 3, k, 1.0, 1.0, Device::Cpu).unwrap();
        g.bench_with_input(BenchmarkId::new("mmkd", k), &k, |bch, _| {
            bch.iter(|| mmkd.weights(&sig).unwrap())
        });
    }
    let (_, t, p, _) = inputs(64, 10, 1);
    g.bench_function("feature_mse 64x64x8x8", |bch| {
        bch.iter(|| {
            loss::feature_mse(p[0].as_ref().unwrap(), t[0].features.as_ref().unwrap()).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
