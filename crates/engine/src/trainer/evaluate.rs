//! Evaluation over a loader (the task's metric and loss) and the running sums of a training
//! epoch that become its [`EpochRecord`].

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use mtkd_distill_core::weighting::TeacherWeights;
use mtkd_distill_core::ModelOutput;
use mtkd_vision_tasks::loader::BatchLoader;
use mtkd_vision_tasks::task::{Metric, MetricReport, Task};

use super::distiller::Terms;
use crate::record::EpochRecord;

/// Evaluate a forward function over a loader: the task's metric report and mean task loss.
pub fn evaluate(
    forward: &dyn Fn(&Tensor) -> Result<ModelOutput>,
    loader: &BatchLoader,
    device: Device,
    task: &dyn Task,
    num_classes: usize,
) -> Result<(MetricReport, f64)> {
    let mut metric = task.metric(num_classes);
    let loss = evaluate_into(forward, loader, device, task, metric.as_mut())?;
    Ok((metric.report(), loss))
}

/// As [`evaluate`], into a metric the caller keeps (to read more than its report, e.g. a
/// detector's detections); returns the mean task loss.
pub fn evaluate_into(
    forward: &dyn Fn(&Tensor) -> Result<ModelOutput>,
    loader: &BatchLoader,
    device: Device,
    task: &dyn Task,
    metric: &mut dyn Metric,
) -> Result<f64> {
    let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
    let mut n = 0usize;
    tch::no_grad(|| -> Result<()> {
        for batch in loader.epoch(0, 0, device) {
            let out = forward(&batch.images)?;
            metric.update(&out.logits, &batch)?;
            loss_sum += task
                .loss(&out.logits, &task.targets(&batch)?)?
                .sum(Kind::Double);
            n += batch.indices.len();
        }
        Ok(())
    })?;
    Ok(loss_sum.double_value(&[]) / n.max(1) as f64)
}

/// Running sums of an epoch, kept as tensors (no device sync per batch).
pub struct Sums {
    pub(super) n: i64,
    /// The samples without their label (the train CE and score are the means over the
    /// others), a tensor so that counting costs no host sync.
    pub(super) unlabelled: Tensor,
    pub(super) batches: usize,
    pub(super) skipped: usize,
    pub(super) loss: Tensor,
    pub(super) ce: Tensor,
    pub(super) kd: Tensor,
    pub(super) feat: Tensor,
    pub(super) correct: Tensor,
    pub(super) weights: Tensor,
    pub(super) weight_batches: i64,
    /// What was not finite in the skipped batches, and how often.
    pub(super) skip_causes: std::collections::BTreeMap<String, usize>,
    pub(super) last_loss: f64,
    /// Wall time spent getting the teachers' outputs (forward passes or shared reads).
    pub(super) teacher_seconds: f64,
    /// Wall time spent computing the strategies' signals from the outputs.
    pub(super) signal_seconds: f64,
    /// Wall time spent in the strategy's weights and feedback (the agent's state, policy and
    /// updates), the reward's forward passes excluded.
    pub(super) strategy_seconds: f64,
    /// Wall time of the student's eval-mode forward passes for a strategy that asks for them
    /// (the clean and meta agents' reward).
    pub(super) reward_seconds: f64,
    /// Data-parallel runs: the ranks and this rank's seconds in the step's collectives.
    pub(super) data_parallel: Option<mtkd_records::record::DataParallel>,
}

impl Sums {
    pub fn new(device: Device, m: usize) -> Sums {
        let z = || Tensor::zeros([], (Kind::Double, device));
        Sums {
            n: 0,
            unlabelled: z(),
            batches: 0,
            skipped: 0,
            loss: z(),
            ce: z(),
            kd: z(),
            feat: z(),
            correct: z(),
            weights: Tensor::zeros([2, m as i64], (Kind::Double, device)),
            weight_batches: 0,
            skip_causes: Default::default(),
            last_loss: f64::NAN,
            teacher_seconds: 0.0,
            signal_seconds: 0.0,
            strategy_seconds: 0.0,
            reward_seconds: 0.0,
            data_parallel: None,
        }
    }

    /// Data-parallel training: the sums over every rank's samples (the weights' batch means
    /// averaged over ranks); the timings stay this rank's.
    pub(super) fn all_reduce(&mut self, c: &dyn mtkd_dist::Collective) -> Result<()> {
        if c.world() == 1 {
            return Ok(());
        }
        let device = self.loss.device();
        let scalars = Tensor::stack(
            &[
                Tensor::from(self.n as f64).to_device(device),
                self.unlabelled.shallow_clone(),
                self.loss.shallow_clone(),
                self.ce.shallow_clone(),
                self.kd.shallow_clone(),
                self.feat.shallow_clone(),
                self.correct.shallow_clone(),
            ],
            0,
        );
        let all = Tensor::cat(&[scalars, self.weights.reshape([-1])], 0).to_device(Device::Cpu);
        let mut v = Vec::<f64>::try_from(&all)?;
        mtkd_dist::all_reduce_f64(c, &mut v)?;
        let at = |i: usize| Tensor::from(v[i]).to_device(device);
        self.n = v[0].round() as i64;
        self.unlabelled = at(1);
        self.loss = at(2);
        self.ce = at(3);
        self.kd = at(4);
        self.feat = at(5);
        self.correct = at(6);
        self.weights = (Tensor::from_slice(&v[7..]).view_as(&self.weights) / c.world() as f64)
            .to_device(device);
        Ok(())
    }

    /// Time spent in a step's collectives on `ranks` ranks.
    pub(super) fn add_collective(&mut self, ranks: usize, seconds: f64) {
        let d = self
            .data_parallel
            .get_or_insert(mtkd_records::record::DataParallel {
                ranks,
                allreduce_seconds: 0.0,
            });
        d.allreduce_seconds += seconds;
    }

    /// The mean training loss over the applied steps' samples so far.
    pub fn mean_loss(&self) -> f64 {
        self.loss.double_value(&[]) / self.n.max(1) as f64
    }

    /// Add an applied step: its batch size `b`, mean loss, per-image CE, with distillation
    /// the terms and the full-pool weights, and the per-image training score sum.
    /// Count a batch's unlabelled samples (`labelled [B]` bool), which its `ce` and `correct`
    /// leave out.
    pub(super) fn add_unlabelled(&mut self, labelled: &Tensor) {
        self.unlabelled += labelled.logical_not().sum(Kind::Double);
    }

    pub(super) fn add(
        &mut self,
        b: i64,
        loss: &Tensor,
        ce: &Tensor,
        distilled: Option<(&Terms, &TeacherWeights)>,
        correct: &Tensor,
    ) {
        self.n += b;
        self.batches += 1;
        self.loss += loss.to_kind(Kind::Double) * b as f64;
        self.ce += ce.sum(Kind::Double);
        self.correct += correct;
        if let Some((terms, full)) = distilled {
            self.kd += terms.kd.detach().sum(Kind::Double);
            self.feat += terms.feature.detach().sum(Kind::Double);
            let mean = Tensor::stack(
                &[
                    full.logit.mean_dim(0, false, Kind::Float),
                    full.feature.mean_dim(0, false, Kind::Float),
                ],
                0,
            );
            self.weights += mean.to_kind(Kind::Double);
            self.weight_batches += 1;
        }
        if self.batches.is_multiple_of(20) {
            self.last_loss = loss.double_value(&[]);
        }
    }

    pub(super) fn record(
        &self,
        epoch: usize,
        lr: f64,
        report: &MetricReport,
        test_loss: f64,
        seconds: f64,
    ) -> EpochRecord {
        let n = self.n.max(1) as f64;
        let scored = (self.n as f64 - self.unlabelled.double_value(&[])).max(1.0);
        let (weights, feature_weights) = if self.weight_batches > 0 {
            let mean = (&self.weights / self.weight_batches as f64).to_device(Device::Cpu);
            (
                Vec::<f64>::try_from(&mean.get(0)).unwrap_or_default(),
                Vec::<f64>::try_from(&mean.get(1)).unwrap_or_default(),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        EpochRecord {
            epoch,
            lr,
            train_loss: self.loss.double_value(&[]) / n,
            train_ce: self.ce.double_value(&[]) / scored,
            train_kd: self.kd.double_value(&[]) / n,
            train_feature: self.feat.double_value(&[]) / n,
            train_metric: 100.0 * self.correct.double_value(&[]) / scored,
            test_loss,
            test: report.clone(),
            teacher_weights: weights,
            teacher_feature_weights: feature_weights,
            class_weights: Vec::new(),
            class_feature_weights: Vec::new(),
            class_credit: Vec::new(),
            pruned: Vec::new(),
            cached_batches: None,
            active_teachers: None,
            strategy_metrics: Default::default(),
            skipped_batches: self.skipped,
            seconds,
            teacher_seconds: self.teacher_seconds,
            data_parallel: self.data_parallel.clone(),
        }
    }
}
