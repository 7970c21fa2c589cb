//! Criterion benchmarks of the MTKD-RL agent's per-step cost (batch 64, three teachers with
//! 64-channel embeddings, 10 classes): building weights, and one update step per buffered batch;
//! the meta mode's weights, which include its look-ahead credit and policy update; and the meta
//! mode on a segmentation batch (32 images of 48 x 48 pixels, 11 classes, a 32-channel head
//! map: the seg-scenes preset's shapes), whose features, credit and weights are per pixel.

use criterion::{criterion_group, criterion_main, Criterion};
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::signals::{BatchSignals, PixelInputs, StudentHead};
use mtkd_distill_core::weighting::{Feedback, WeightingStrategy};
use mtkd_distill_core::ModelOutput;
use mtkd_rl_weighting::agent::{AgentConfig, Mode, MtkdAgent, Quiz};

fn signals() -> BatchSignals {
    tch::manual_seed(0);
    let o = (Kind::Float, Device::Cpu);
    let t: Vec<ModelOutput> = (0..3)
        .map(|_| ModelOutput {
            logits: Tensor::randn([64, 10], o),
            features: Some(Tensor::randn([64, 64, 7, 7], o)),
        })
        .collect();
    let p: Vec<Option<Tensor>> = (0..3)
        .map(|_| Some(Tensor::randn([64, 64, 7, 7], o)))
        .collect();
    BatchSignals::compute(
        &Tensor::randn([64, 10], o),
        &p,
        &t,
        &Tensor::randint(10, [64], (Kind::Int64, Device::Cpu)),
        4.0,
    )
    .unwrap()
}

/// A segmentation batch as the engine gives it to a per-pixel strategy.
fn segmentation_signals() -> BatchSignals {
    tch::manual_seed(1);
    let o = (Kind::Float, Device::Cpu);
    let (b, k, d, hw) = (32, 11, 32, 48);
    let t: Vec<ModelOutput> = (0..3)
        .map(|_| ModelOutput {
            logits: Tensor::randn([b, k, hw, hw], o) * 2.0,
            features: None,
        })
        .collect();
    let student = Tensor::randn([b, k, hw, hw], o);
    let targets = Tensor::randint(k, [b, hw, hw], (Kind::Int64, Device::Cpu));
    let labels = Tensor::randint(k, [b], (Kind::Int64, Device::Cpu));
    let mut s = BatchSignals::compute_dense(
        &student,
        &[None, None, None],
        &t,
        &targets,
        &labels,
        255,
        2.0,
        None,
    )
    .unwrap();
    let fmap = Tensor::rand([b, d, hw / 4, hw / 4], o);
    s.student_head = Some(StudentHead {
        embedding: fmap.mean_dim([2i64, 3].as_slice(), false, Kind::Float),
        weight: Tensor::randn([k, d], o) * 0.1,
        bias: Some(Tensor::zeros([k], o)),
        lr: 0.05,
        pixel_embedding: Some(fmap.upsample_bilinear2d([hw, hw], false, None, None)),
    });
    s.pixels = Some(PixelInputs {
        teacher_logits: t.iter().map(|o| o.logits.shallow_clone()).collect(),
        student_logits: student,
        targets,
        ignore_index: 255,
    });
    s
}

fn bench(c: &mut Criterion) {
    tch::set_num_threads(1);
    let s = signals();
    let mut g = c.benchmark_group("agent");
    for mode in [Mode::Parity, Mode::Clean] {
        let cfg = AgentConfig {
            mode,
            warmup_epochs: 0,
            agent_step: usize::MAX,
            buffer_steps: usize::MAX,
            ..Default::default()
        };
        let mut a = MtkdAgent::new(cfg, &[64, 64, 64], 10, Device::Cpu).unwrap();
        a.start_epoch(1).unwrap();
        g.bench_function(format!("{mode:?} weights"), |b| {
            b.iter(|| a.weights(&s).unwrap())
        });
        let loss = Tensor::rand([64], (Kind::Float, Device::Cpu));
        g.bench_function(format!("{mode:?} observe + update of one batch"), |b| {
            b.iter(|| {
                let w = a.weights(&s).unwrap();
                let fb = Feedback {
                    per_sample_loss: loss.shallow_clone(),
                    pre_step_ce: loss.shallow_clone(),
                    eval_ce: Some((loss.shallow_clone(), &loss * 0.9)),
                    step: 0,
                };
                a.observe(&s, &w, &fb).unwrap();
                a.update().unwrap();
            })
        });
    }
    // Meta mode: weights include the look-ahead credit and one Adam step (every call).
    let mut s = s;
    s.student_head = Some(mtkd_distill_core::signals::StudentHead {
        embedding: Tensor::rand([64, 64], (Kind::Float, Device::Cpu)),
        weight: Tensor::randn([10, 64], (Kind::Float, Device::Cpu)) * 0.1,
        bias: Some(Tensor::zeros([10], (Kind::Float, Device::Cpu))),
        lr: 0.05,
        pixel_embedding: None,
    });
    let dense = segmentation_signals();
    for (batch, what) in [
        (&s, "Meta weights (credit + policy update)"),
        (&dense, "Meta per-pixel weights, segmentation 32 x 48 x 48"),
    ] {
        for (quiz, name) in [(Quiz::Own, "own"), (Quiz::Current, "current")] {
            let cfg = AgentConfig {
                mode: Mode::Meta,
                quiz,
                ..Default::default()
            };
            let mut a =
                mtkd_rl_weighting::meta::MetaAgent::new(cfg, 3, 1.0, 1.0, Device::Cpu).unwrap();
            g.bench_function(format!("{what}, quiz {name}"), |b| {
                b.iter(|| a.weights(batch).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
