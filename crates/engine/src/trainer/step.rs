//! One optimizer step: the task loss, the teachers' outputs, the signals, the strategy's
//! weights, the weighted KD and feature terms, the non-finite policy and the strategy's feedback.

use super::*;

impl<'a> Trainer<'a> {
    /// One optimizer step on a batch. Returns false when the batch was skipped (non-finite loss
    /// under the `skip` policy).
    pub(super) fn step(
        &mut self,
        batch: &Batch,
        sums: &mut Sums,
        shared: Option<&mut EpochOutputs>,
        epoch: usize,
        step: u64,
    ) -> Result<bool> {
        // A skipped batch must leave no trace: BatchNorm's running statistics, updated by the
        // training-mode forward, are put back when the batch is skipped.
        let saved: Option<Vec<Tensor>> = (self.cfg.train.on_nonfinite == NonFinitePolicy::Skip)
            .then(|| self.buffers.iter().map(Tensor::copy).collect());
        let (images, labels, indices) = (&batch.images, &batch.labels, &batch.indices[..]);
        let targets = &self.task.targets(batch)?;
        let out = self.student.forward_t(images, true);
        let ce = self.task.loss(&out.logits, targets)?;
        let b = labels.size()[0];
        let distill = self.distill().cloned();
        let (per_sample, kd, feat, weights_mean) = match &distill {
            None => (&ce * 1.0, None, None, None),
            Some(d) => {
                let t0 = Instant::now();
                let pool = &self.pool;
                let active = &self.active;
                let t_outs = match shared {
                    // Stored outputs hold the whole pool; a pruned teacher's column is dropped.
                    Some(shared) => {
                        let all =
                            shared.batch(indices, self.device, || teacher_outputs(pool, images))?;
                        if active.len() == all.len() {
                            all
                        } else {
                            all.into_iter()
                                .enumerate()
                                .filter(|(i, _)| active.contains(i))
                                .map(|(_, o)| o)
                                .collect()
                        }
                    }
                    None => match self.output_cache.as_mut() {
                        Some(cache) => cache.outputs(active, indices, |which| {
                            teacher_outputs_of(pool, which, images)
                        })?,
                        None => teacher_outputs_of(pool, active, images)?,
                    },
                };
                // Without feature KD the teachers' maps are not used, and shared outputs do not
                // store them: drop them here too, so that the strategy sees the same signals
                // whether the outputs were computed or read.
                let t_outs: Vec<ModelOutput> = if crate::shared::with_features(self.cfg) {
                    t_outs
                } else {
                    t_outs
                        .into_iter()
                        .map(|o| ModelOutput {
                            logits: o.logits,
                            features: None,
                        })
                        .collect()
                };
                sums.teacher_seconds += t0.elapsed().as_secs_f64();
                let features = out
                    .features
                    .as_ref()
                    .ok_or_else(|| anyhow!("the student gives no feature map"))?;
                let projected: Vec<Option<Tensor>> = if self.adapters.is_empty() {
                    (0..t_outs.len()).map(|_| None).collect()
                } else {
                    self.active
                        .iter()
                        .map(|&i| self.adapters[i].forward(features, true).map(Some))
                        .collect::<std::result::Result<_, _>>()?
                };
                // The KL terms with gradient, once; the signals get them detached.
                let kl_terms: Vec<Tensor> = t_outs
                    .iter()
                    .map(|t| self.task.kd(&out.logits, &t.logits, d.temperature, targets))
                    .collect::<std::result::Result<_, _>>()?;
                let t1 = Instant::now();
                let mut signals = self.task.signals(
                    &out.logits,
                    &projected,
                    &t_outs,
                    targets,
                    labels,
                    d.temperature,
                    Some(&kl_terms),
                )?;
                if self.strategy.wants_student_head() {
                    let (weight, bias) = self.student.classifier();
                    signals.student_head = Some(StudentHead {
                        embedding: out
                            .embedding()
                            .ok_or_else(|| anyhow!("the student gives no feature map"))?
                            .detach(),
                        weight: weight.detach(),
                        bias: bias.as_ref().map(Tensor::detach),
                        lr: self.opt.lr,
                    });
                }
                sums.signal_seconds += t1.elapsed().as_secs_f64();
                let t2 = Instant::now();
                let w = self.strategy.weights(&signals).with_context(|| {
                    format!(
                        "strategy `{}` at epoch {} step {step}",
                        self.strategy.name(),
                        epoch + 1
                    )
                })?;
                sums.strategy_seconds += t2.elapsed().as_secs_f64();
                let mut kd = Tensor::zeros([b], (Kind::Float, self.device));
                let mut feat = Tensor::zeros([b], (Kind::Float, self.device));
                // `distill.pixel_weights = "confidence"`: each teacher's per-image weight is
                // spread over the image's pixels by its confidence there (docs/METHOD.md
                // section 13); the KD term is then recomputed per pixel.
                let per_pixel = match d.pixel_weights {
                    crate::config::PixelWeights::Image => None,
                    crate::config::PixelWeights::Confidence => Some(loss::pixel_weighted_kd(
                        &out.logits,
                        &t_outs
                            .iter()
                            .map(|t| t.logits.shallow_clone())
                            .collect::<Vec<_>>(),
                        &w.logit,
                        targets,
                        i64::from(mtkd_vision_tasks::segmentation::IGNORE),
                        d.temperature,
                    )?),
                };
                for (m, (t, term)) in t_outs.iter().zip(&kl_terms).enumerate() {
                    if per_pixel.is_none() {
                        kd += w.logit.select(1, m as i64) * term;
                    }
                    if let (Some(p), Some(tf)) = (&projected[m], &t.features) {
                        let term = match d.feature_loss {
                            crate::config::FeatureLoss::Mse => loss::feature_mse(p, tf)?,
                            crate::config::FeatureLoss::Cwd => loss::cwd(p, tf, d.temperature)?,
                            crate::config::FeatureLoss::Pearson => loss::feature_pearson(p, tf)?,
                        };
                        feat += w.feature.select(1, m as i64) * term;
                    }
                }
                if let Some(k) = per_pixel {
                    kd = k;
                }
                let total = &ce * d.ce_weight + &kd * d.kd_weight + &feat * d.feature_weight;
                let full = self.to_full(&w)?;
                let wm = Tensor::stack(
                    &[
                        full.logit.mean_dim(0, false, Kind::Float),
                        full.feature.mean_dim(0, false, Kind::Float),
                    ],
                    0,
                );
                (
                    total,
                    Some(kd),
                    Some(feat),
                    Some((wm, signals, w, t_outs, full)),
                )
            }
        };
        let loss = per_sample.mean(Kind::Float);
        // One check per step; the diagnosis below runs only when it fails.
        if loss::ensure_finite("loss", &loss).is_err() {
            let bad = |t: &Tensor| loss::ensure_finite("", t).is_err();
            let mut what = None;
            if let Some((_, _, w, t_outs, _)) = &weights_mean {
                for (p, t) in self.active.iter().map(|&i| &self.pool[i]).zip(t_outs) {
                    if what.is_none() && bad(&t.logits) {
                        what = Some(format!("the logits of teacher `{}`", p.teacher.name()));
                    }
                }
                if what.is_none() && (bad(&w.logit) || bad(&w.feature)) {
                    what = Some(format!(
                        "the weights of strategy `{}`",
                        self.strategy.name()
                    ));
                }
            }
            let what = what.unwrap_or_else(|| {
                if bad(&ce) {
                    "the cross-entropy term".to_owned()
                } else if kd.as_ref().is_some_and(bad) {
                    "the KD term".to_owned()
                } else {
                    "the feature term".to_owned()
                }
            });
            if let Some(saved) = saved {
                tch::no_grad(|| {
                    for (var, copy) in self.buffers.iter_mut().zip(&saved) {
                        var.copy_(copy);
                    }
                });
            }
            return self.non_finite(epoch, step, &what, sums);
        }
        let eval_before = if weights_mean.is_some() && self.strategy.wants_eval_ce() {
            let t3 = Instant::now();
            let before = tch::no_grad(|| self.student.forward_t(images, false));
            let ce = self.task.loss(&before.logits, targets)?;
            sums.reward_seconds += t3.elapsed().as_secs_f64();
            Some(ce)
        } else {
            None
        };
        self.opt.zero_grad();
        loss.backward();
        self.opt.step();
        let correct = self
            .task
            .train_score(&out.logits.detach(), targets)?
            .sum(Kind::Double);
        sums.add(
            b,
            &loss.detach(),
            &ce.detach(),
            kd.as_ref(),
            feat.as_ref(),
            &correct,
            weights_mean.as_ref().map(|x| &x.0),
        );
        if let Some((_, signals, w, _, full)) = weights_mean {
            self.record_weights(&full, labels, indices, epoch, step)?;
            if epoch + 1 == self.cfg.train.epochs {
                crate::audit::collect(&mut self.audit, &signals, &full, &self.active, indices)?;
            }
            let eval_ce = match eval_before {
                Some(before) => {
                    let t4 = Instant::now();
                    let after = tch::no_grad(|| self.student.forward_t(images, false));
                    let ce = self.task.loss(&after.logits, targets)?;
                    sums.reward_seconds += t4.elapsed().as_secs_f64();
                    Some((before, ce))
                }
                None => None,
            };
            let t5 = Instant::now();
            let feedback = Feedback {
                per_sample_loss: per_sample.detach(),
                pre_step_ce: ce.detach(),
                eval_ce,
                step,
            };
            self.strategy
                .observe(&signals, &w, &feedback)
                .with_context(|| {
                    format!(
                        "strategy `{}` at epoch {} step {step}",
                        self.strategy.name(),
                        epoch + 1
                    )
                })?;
            sums.strategy_seconds += t5.elapsed().as_secs_f64();
        }
        Ok(true)
    }

    /// Weights of the active teachers `[B, M_active]` spread over the full pool `[B, M]` (0 for
    /// a pruned teacher), detached.
    pub(super) fn to_full(&self, w: &TeacherWeights) -> Result<TeacherWeights> {
        let m = self.pool.len();
        if self.active.len() == m {
            return Ok(TeacherWeights {
                logit: w.logit.detach(),
                feature: w.feature.detach(),
            });
        }
        let idx = Tensor::from_slice(&self.active.iter().map(|&i| i as i64).collect::<Vec<_>>())
            .to_device(self.device);
        let spread = |t: &Tensor| -> Result<Tensor> {
            let b = t.size()[0];
            Ok(
                Tensor::zeros([b, m as i64], (Kind::Float, self.device)).f_index_copy(
                    1,
                    &idx,
                    &t.detach().to_kind(Kind::Float),
                )?,
            )
        };
        Ok(TeacherWeights {
            logit: spread(&w.logit)?,
            feature: spread(&w.feature)?,
        })
    }

    pub(super) fn non_finite(
        &self,
        epoch: usize,
        step: u64,
        what: &str,
        sums: &mut Sums,
    ) -> Result<bool> {
        let ckpt_dir = self.dir.join("checkpoints");
        let kept = if checkpoint::any(&ckpt_dir) {
            format!(
                "The last good checkpoint is kept in {} (mtkd train --resume {} continues from it)",
                ckpt_dir.display(),
                self.dir.display()
            )
        } else {
            "No epoch finished, so there is no checkpoint".to_owned()
        };
        match self.cfg.train.on_nonfinite {
            NonFinitePolicy::Stop => bail!(
                "non-finite loss at epoch {} (global step {}): {what} is NaN or infinite. {kept}; \
                 lower train.lr or set train.on_nonfinite = \"skip\"",
                epoch + 1,
                step,
            ),
            NonFinitePolicy::Skip => {
                tracing::warn!(
                    epoch = epoch + 1,
                    step,
                    what,
                    "non-finite loss: batch skipped"
                );
                sums.skipped += 1;
                sums.batches += 1;
                *sums.skip_causes.entry(what.to_owned()).or_default() += 1;
                let budget = self.cfg.train.skip_budget;
                let allowed = (budget * self.epoch_batches as f64).floor() as usize;
                if sums.skipped > allowed {
                    let mut causes: Vec<(&String, &usize)> = sums.skip_causes.iter().collect();
                    causes.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                    bail!(
                        "train.on_nonfinite = \"skip\": {} of the {} batches of epoch {} had a non-finite \
                         loss, over train.skip_budget = {budget} ({allowed} batches). Cause: {}. {kept}",
                        sums.skipped,
                        self.epoch_batches,
                        epoch + 1,
                        causes
                            .iter()
                            .map(|(w, n)| format!("{w} ({n} batches)"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                Ok(false)
            }
        }
    }
}
