//! Step throughput for the performance report (`mtkd bench-steps`, `cargo xtask bench`): the
//! trainer's own `step` (the code a training run executes) timed on real batches of a config,
//! for the step modes CE only, one-teacher KD, AVER and MTKD-RL, and the machine's measured
//! peak (a large convolution forward and backward, a matmul) through the same libtorch.
//!
//! The batches are drawn from the config's training loader before the clock starts, so the
//! figures are the step's (data loading runs on its own thread in training). Each mode runs
//! `warmup` untimed steps, closes that epoch (the agent's update, untimed), then `steps` timed
//! steps and the end of that epoch, timed: the published agent updates once per epoch from
//! its buffer, so its update cost belongs to the step.

use serde::Serialize;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::evaluate::Sums;
use super::pool::build_pool;
use super::{device_of, teacher_head, DistillStep, Observer};
use crate::config::{Config, StrategyKind};
use crate::dataset::Datasets;
pub use mtkd_report::bench::{cpu_model, utc_now, write_report, BenchMode, PEAK_CONV_SHAPES};

/// The timing of one mode.
#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub mode: BenchMode,
    pub batch_size: i64,
    /// Seconds of each timed step.
    pub step_seconds: Vec<f64>,
    /// Seconds spent in the teachers' forward passes over the timed steps.
    pub teacher_seconds: f64,
    /// Seconds spent computing the strategies' signals over the timed steps.
    pub signal_seconds: f64,
    /// Seconds spent in the strategy's weights and feedback over the timed steps (the agent's
    /// state, policy and buffered updates), the reward's forward passes excluded.
    pub strategy_seconds: f64,
    /// Seconds of the student's eval-mode forward passes for the reward (clean and meta agents)
    /// over the timed steps.
    pub reward_seconds: f64,
    /// Seconds of the end of the timed epoch (the agent's update for MTKD-RL).
    pub end_epoch_seconds: f64,
    /// Images per second over the timed steps and the end of the epoch.
    pub images_per_second: f64,
    /// Bytes the strategy held for its update after the timed steps (the agent's buffer).
    pub buffered_bytes: u64,
}

/// What a reference implementation needs to run the same steps (`scripts/bench_eager.py`).
#[derive(Debug, Clone, Serialize)]
pub struct BenchPlan {
    /// The task: `classification`, `segmentation` or `detection`.
    pub task: mtkd_vision_tasks::task::TaskKind,
    pub student: String,
    /// The student's head: `classifier`, `fcn`, `aspp` or `fcos`.
    pub student_head: String,
    /// The student's variables (BatchNorm statistics included), sorted by name, with their
    /// shapes: the reference's PyTorch twin must have the same `state_dict`.
    pub student_state: Vec<(String, Vec<i64>)>,
    /// The student's trainable parameter count.
    pub student_parameters: i64,
    pub input: (i64, i64, i64),
    pub num_classes: i64,
    pub batch_size: i64,
    /// TorchScript files of the teachers, pool order; `None` for a teacher trained by mtkd
    /// (its exported `student.pt` has no feature map: the reference rebuilds it from
    /// `native_teachers`).
    pub teachers: Vec<Option<PathBuf>>,
    /// Teachers trained by mtkd, pool order: `(arch, weights .safetensors)`.
    pub native_teachers: Vec<Option<(String, PathBuf)>>,
    /// What the teachers compute in (`distill.teacher_precision`).
    pub teacher_precision: mtkd_distill_core::Precision,
    /// The heads of the teachers trained by mtkd, pool order (`None` for the others).
    pub native_teacher_heads: Vec<Option<String>>,
    pub temperature: f64,
    pub ce_weight: f64,
    pub kd_weight: f64,
    pub feature_weight: f64,
    /// The feature term's loss (`distill.feature_loss`: `mse`, `cwd`, `pearson`).
    pub feature_loss: crate::config::FeatureLoss,
    /// Segmentation: the KD loss on logits (`kl`, `cwd`), how teacher weights vary inside an
    /// image (`image`, `confidence`) and the mask label that does not count.
    pub dense_kd: mtkd_vision_tasks::task::DenseKd,
    pub pixel_weights: crate::config::PixelWeights,
    pub ignore_index: i64,
    /// Detection: the box KD weight inside each teacher's KD term, and the layout and loss
    /// settings (`None` for other tasks).
    pub box_kd_weight: f64,
    pub detection: Option<DetectionPlan>,
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub agent_mode: String,
    pub agent_hidden: i64,
    pub agent_lr: f64,
    /// Parity mode: the agent updates after this many steps (its buffer holds up to this many).
    pub agent_step: usize,
    /// Clean and meta modes: the agent's bounded buffer, in steps.
    pub agent_buffer_steps: usize,
    /// Clean mode: the policy's standard deviation and the epochs of equal weights.
    pub agent_sigma: f64,
    pub agent_warmup_epochs: usize,
    /// Training steps per epoch of the config.
    pub epoch_steps: usize,
}

/// The detection settings of a [`BenchPlan`] (`mtkd_vision_tasks::detection::{layout, loss}`).
#[derive(Debug, Clone, Serialize)]
pub struct DetectionPlan {
    pub strides: Vec<i64>,
    pub center_radius: f64,
    pub size_factor: f64,
    pub focal_alpha: f64,
    pub focal_gamma: f64,
    /// The most boxes of one image among the timed batches (the padded `N` of `[B, N, 6]`).
    pub max_objects: i64,
}

/// The config a mode runs: `cfg` with its strategy replaced; the run never reaches the last
/// epoch (no audit is collected).
pub fn mode_config(cfg: &Config, mode: BenchMode) -> Result<Config> {
    let mut c = cfg.clone();
    c.train.epochs = 1000;
    let first = cfg
        .teachers
        .first()
        .map(|t| t.name.clone())
        .ok_or_else(|| anyhow!("the config has no [[teachers]]"))?;
    let d = c
        .distill
        .as_mut()
        .ok_or_else(|| anyhow!("the config has no [distill] table"))?;
    d.strategy = match mode {
        BenchMode::Ce => StrategyKind::None,
        BenchMode::Kd1 => {
            d.teacher = Some(first);
            StrategyKind::Single
        }
        BenchMode::Aver => StrategyKind::Equal,
        BenchMode::MtkdRl => StrategyKind::MtkdRl,
        BenchMode::MtkdRlCached => {
            // Ample: the cache is allocated untouched and only the timed samples are stored.
            d.output_cache_mb = 1 << 20;
            StrategyKind::MtkdRl
        }
    };
    if mode == BenchMode::MtkdRlCached {
        c.data.augment = Default::default();
    }
    Ok(c)
}

/// Time the trainer's step for each mode on `cfg` (teachers are trained first when missing
/// from the cache). Returns the plan for the reference script and one timing per mode.
pub fn bench_steps(
    cfg: &Config,
    modes: &[BenchMode],
    warmup: usize,
    steps: usize,
    obs: &mut dyn Observer,
) -> Result<(BenchPlan, Vec<StepTiming>)> {
    if steps == 0 {
        bail!("bench-steps: --steps must be at least 1");
    }
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
    if cfg.data.has_unlabelled() {
        bail!(
            "bench-steps times fully labelled steps (its CE mode has no teachers to give the \
             unlabelled samples targets): remove data.labels, data.unlabelled and \
             data.labelled_share from the config"
        );
    }
    let device = device_of(&cfg.run.device)?;
    obs.phase("loading data");
    let data = Datasets::load(&cfg.data)?;
    let mut pool = build_pool(cfg, &data, device, obs)?;
    let in_shape = data.input_shape(&cfg.data)?;
    let bs = cfg.train.batch_size;
    // The batches, drawn before any clock starts (epochs cycled when one is too short).
    let loader = data.train_loader(&cfg.data, bs, cfg.run.seed)?;
    let mut batches = Vec::with_capacity(warmup + steps);
    let mut epoch = 0u64;
    while batches.len() < warmup + steps {
        let need = warmup + steps - batches.len();
        batches.extend(
            loader
                .epoch(epoch, 0, device)
                .filter(|b| b.labels.size()[0] as usize == bs)
                .take(need),
        );
        epoch += 1;
        if epoch > 1000 {
            bail!("bench-steps: the training split has no full batch of {bs}");
        }
    }
    let d = cfg
        .distill
        .clone()
        .ok_or_else(|| anyhow!("the config has no [distill] table"))?;
    let agent = d.agent.clone().unwrap_or_default();
    let task = cfg.data.task();
    let detection = (task == mtkd_vision_tasks::task::TaskKind::Detection).then(|| {
        use mtkd_vision_tasks::detection::{layout, loss};
        DetectionPlan {
            strides: layout::STRIDES.to_vec(),
            center_radius: layout::CENTER_RADIUS,
            size_factor: layout::SIZE_FACTOR,
            focal_alpha: loss::FOCAL_ALPHA,
            focal_gamma: loss::FOCAL_GAMMA,
            max_objects: batches
                .iter()
                .filter_map(|b| b.targets.objects().map(|t| t.size()[1]))
                .max()
                .unwrap_or(0),
        }
    });
    let mut plan = BenchPlan {
        task,
        student: cfg.student.arch.to_string(),
        student_head: cfg.student.head.to_string(),
        // Filled from the first mode's trainer.
        student_state: Vec::new(),
        student_parameters: 0,
        input: in_shape,
        num_classes: data.num_classes(),
        batch_size: bs as i64,
        teachers: pool
            .iter()
            .map(|p| {
                p.file
                    .extension()
                    .is_some_and(|e| e == "pt")
                    .then(|| p.file.clone())
            })
            .collect(),
        native_teachers: cfg
            .teachers
            .iter()
            .zip(&pool)
            .map(|(t, p)| {
                t.arch
                    .filter(|_| p.file.extension().is_some_and(|e| e == "safetensors"))
                    .map(|a| (a.to_string(), p.file.clone()))
            })
            .collect(),
        teacher_precision: d.teacher_precision,
        native_teacher_heads: cfg
            .teachers
            .iter()
            .zip(&pool)
            .map(|(t, p)| {
                (t.arch.is_some() && p.file.extension().is_some_and(|e| e == "safetensors"))
                    .then(|| teacher_head(cfg, t).to_string())
            })
            .collect(),
        temperature: d.temperature,
        ce_weight: d.ce_weight,
        kd_weight: d.kd_weight,
        feature_weight: d.feature_weight,
        feature_loss: d.feature_loss,
        dense_kd: d.dense_kd,
        pixel_weights: d.pixel_weights,
        ignore_index: i64::from(mtkd_vision_tasks::segmentation::IGNORE),
        box_kd_weight: d.box_kd_weight,
        detection,
        lr: cfg.train.lr,
        momentum: cfg.train.momentum,
        nesterov: cfg.train.nesterov,
        weight_decay: cfg.train.weight_decay,
        agent_mode: format!("{:?}", agent.mode).to_lowercase(),
        agent_hidden: agent.hidden,
        agent_lr: agent.lr,
        agent_step: agent.agent_step,
        agent_buffer_steps: agent.buffer_steps,
        agent_sigma: agent.sigma,
        agent_warmup_epochs: agent.warmup_epochs,
        epoch_steps: loader.num_batches(),
    };
    let mut out = Vec::new();
    for &mode in modes {
        let mcfg = mode_config(cfg, mode)?;
        obs.phase(&format!("timing {} steps of mode {}", steps, mode.name()));
        let members = if mode == BenchMode::Ce {
            Vec::new()
        } else {
            std::mem::take(&mut pool)
        };
        // The modes change only [distill]: the loaded sets serve every mode.
        let mut step = DistillStep::new(&mcfg, members, &data, device)?;
        step.open_output_cache(data.train.len())?;
        if plan.student_state.is_empty() {
            let mut state: Vec<(String, Vec<i64>)> = step
                .student_vs
                .variables()
                .into_iter()
                .map(|(n, t)| (n, t.size()))
                .collect();
            state.sort();
            plan.student_state = state;
            plan.student_parameters = mtkd_student::arch::parameter_count(&step.student_vs);
        }
        let timing = (|| -> Result<StepTiming> {
            let mut sums = Sums::new(device, step.pool.len());
            step.start_epoch(1, mcfg.train.lr)?;
            if mode == BenchMode::MtkdRlCached {
                // The first epoch: the timed batches' samples go into the cache.
                for (i, b) in batches[warmup..].iter().enumerate() {
                    step.run(b, &mut sums, 1, i as u64)?;
                }
            }
            for (i, b) in batches[..warmup].iter().enumerate() {
                step.run(b, &mut sums, 1, i as u64)?;
            }
            step.end_epoch(1)?;
            step.start_epoch(2, mcfg.train.lr)?;
            let mut sums = Sums::new(device, step.pool.len());
            let mut step_seconds = Vec::with_capacity(steps);
            for (i, b) in batches[warmup..].iter().enumerate() {
                let t0 = Instant::now();
                step.run(b, &mut sums, 2, (warmup + i) as u64)?;
                // The step's results are read back as training reads them (the loss sum).
                let _ = sums.loss.double_value(&[]);
                step_seconds.push(t0.elapsed().as_secs_f64());
            }
            let buffered_bytes = step.distiller.strategy.buffered_bytes();
            let t0 = Instant::now();
            step.end_epoch(2)?;
            let end_epoch_seconds = t0.elapsed().as_secs_f64();
            let total: f64 = step_seconds.iter().sum::<f64>() + end_epoch_seconds;
            Ok(StepTiming {
                mode,
                batch_size: bs as i64,
                images_per_second: (steps * bs) as f64 / total,
                step_seconds,
                teacher_seconds: sums.teacher_seconds,
                signal_seconds: sums.signal_seconds,
                strategy_seconds: sums.strategy_seconds,
                reward_seconds: sums.reward_seconds,
                end_epoch_seconds,
                buffered_bytes,
            })
        })()
        .with_context(|| format!("bench-steps: mode {}", mode.name()))?;
        tracing::info!(
            mode = mode.name(),
            images_per_second = timing.images_per_second,
            "timed"
        );
        out.push(timing);
        if mode != BenchMode::Ce {
            pool = std::mem::take(&mut step.pool.members);
        }
    }
    Ok((plan, out))
}

/// The machine's measured peak through libtorch, in GFLOP/s.
#[derive(Debug, Clone, Serialize)]
pub struct Peak {
    /// The best 3x3 convolution forward over [`PEAK_CONV_SHAPES`].
    pub conv_forward: f64,
    /// The best of the same convolutions, forward and backward (input and weight gradients).
    pub conv_forward_backward: f64,
    /// The shape (`[batch, channels, side, side]`, channels in = out) of the best forward and
    /// of the best forward and backward.
    pub conv_forward_shape: [i64; 4],
    pub conv_forward_backward_shape: [i64; 4],
    /// A 2048 x 2048 float32 matmul.
    pub matmul: f64,
}

/// Measure [`Peak`] on `device` (best of `reps` after a warm-up, per shape).
pub fn measure_peak(device: Device, reps: usize) -> Result<Peak> {
    let opts = (Kind::Float, device);
    let sync = |t: &Tensor| -> Result<()> {
        let _ = t.f_sum(Kind::Float)?.f_double_value(&[])?;
        Ok(())
    };
    let best = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let mut best = f64::INFINITY;
        for _ in 0..reps.max(1) {
            let t0 = Instant::now();
            f()?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let mut peak = Peak {
        conv_forward: 0.0,
        conv_forward_backward: 0.0,
        conv_forward_shape: PEAK_CONV_SHAPES[0],
        conv_forward_backward_shape: PEAK_CONV_SHAPES[0],
        matmul: 0.0,
    };
    for shape in PEAK_CONV_SHAPES {
        let [b, c, hw, _] = shape;
        let k = 3i64;
        let x = Tensor::f_randn([b, c, hw, hw], opts)?.set_requires_grad(true);
        let w = Tensor::f_randn([c, c, k, k], opts)?.set_requires_grad(true);
        let conv_flops = 2.0 * (b * c * c * k * k * hw * hw) as f64;
        let fwd = tch::no_grad(|| {
            best(&mut || sync(&x.f_conv2d(&w, None::<Tensor>, [1], [1], [1], 1)?))
        })?;
        let fb = best(&mut || {
            let y = x.f_conv2d(&w, None::<Tensor>, [1], [1], [1], 1)?;
            y.f_sum(Kind::Float)?.backward();
            sync(&w.grad())?;
            let _ = x.grad().f_zero_()?;
            let _ = w.grad().f_zero_()?;
            Ok(())
        })?;
        let (gf, gfb) = (conv_flops / fwd / 1e9, 3.0 * conv_flops / fb / 1e9);
        tracing::info!(
            ?shape,
            forward = gf,
            forward_backward = gfb,
            "peak convolution"
        );
        if gf > peak.conv_forward {
            peak.conv_forward = gf;
            peak.conv_forward_shape = shape;
        }
        if gfb > peak.conv_forward_backward {
            peak.conv_forward_backward = gfb;
            peak.conv_forward_backward_shape = shape;
        }
    }
    let n = 2048i64;
    let a = Tensor::f_randn([n, n], opts)?;
    let bm = Tensor::f_randn([n, n], opts)?;
    let mm = tch::no_grad(|| best(&mut || sync(&a.f_matmul(&bm)?)))?;
    peak.matmul = 2.0 * (n * n * n) as f64 / mm / 1e9;
    Ok(peak)
}
