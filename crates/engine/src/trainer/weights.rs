//! Teacher membership and weight records: pruning (`[distill.prune]`), per-class weights and
//! `weights.csv`.

use super::*;

impl<'a> Trainer<'a> {
    pub(super) fn active_names(&self) -> Vec<String> {
        self.active
            .iter()
            .map(|&i| self.pool[i].teacher.name().to_owned())
            .collect()
    }

    /// Keep only the teachers at `active` (full pool positions, increasing).
    pub(super) fn set_active(&mut self, active: Vec<usize>) -> Result<()> {
        if active.is_empty() || active.iter().any(|&i| i >= self.pool.len()) {
            bail!(
                "the checkpoint's active teachers {active:?} do not fit a pool of {}",
                self.pool.len()
            );
        }
        let keep: Vec<usize> = active
            .iter()
            .map(|i| self.active.iter().position(|a| a == i))
            .collect::<Option<_>>()
            .ok_or_else(|| anyhow!("a pruned teacher cannot come back to the pool"))?;
        self.strategy
            .retain_teachers(&keep)
            .with_context(|| format!("strategy `{}`", self.strategy.name()))?;
        self.active = active;
        Ok(())
    }

    /// `[distill.prune]` at the end of an epoch: count the epochs each active teacher spent under
    /// the threshold and drop those past their patience. Returns the names that left.
    pub(super) fn prune_after_epoch(&mut self, rec: &EpochRecord) -> Result<Vec<String>> {
        let Some(p) = self.distill().and_then(|d| d.prune.clone()) else {
            return Ok(Vec::new());
        };
        let mut leaving = Vec::new();
        for &i in &self.active {
            let w = rec.teacher_weights.get(i).copied().unwrap_or(f64::NAN);
            if w < p.threshold {
                self.prune_counts[i] += 1;
            } else {
                self.prune_counts[i] = 0;
            }
            if self.prune_counts[i] >= p.patience {
                leaving.push((w, i));
            }
        }
        // Lowest weight first, never below min_teachers.
        leaving.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let room = self.active.len().saturating_sub(p.min_teachers);
        leaving.truncate(room);
        if leaving.is_empty() {
            return Ok(Vec::new());
        }
        let gone: Vec<usize> = leaving.iter().map(|&(_, i)| i).collect();
        let names: Vec<String> = gone
            .iter()
            .map(|&i| self.pool[i].teacher.name().to_owned())
            .collect();
        let active: Vec<usize> = self
            .active
            .iter()
            .copied()
            .filter(|i| !gone.contains(i))
            .collect();
        self.set_active(active)?;
        for (n, (w, _)) in names.iter().zip(&leaving) {
            tracing::info!(teacher = %n, epoch = rec.epoch, mean_weight = w, threshold = p.threshold,
                "teacher leaves the pool (distill.prune)");
        }
        Ok(names)
    }

    /// The epoch's per-class mean weights into its record.
    pub(super) fn class_weights_into(&self, rec: &mut EpochRecord) -> Result<()> {
        if let Some((sums, fsums, counts)) = &self.per_class {
            let m = self.pool.len().max(1);
            let grid = |t: &Tensor| -> Result<Vec<Vec<f64>>> {
                let mean = t / counts.clamp_min(1.0).unsqueeze(1);
                let v: Vec<f64> = Vec::try_from(&mean.to_device(Device::Cpu).flatten(0, -1))?;
                Ok(v.chunks(m).map(<[f64]>::to_vec).collect())
            };
            rec.class_weights = grid(sums)?;
            rec.class_feature_weights = grid(fsums)?;
        }
        Ok(())
    }

    /// Open `weights.csv` for appending, keeping only the lines of the `done` completed epochs
    /// (a resumed run replays the interrupted epoch, so its partial lines go).
    pub(super) fn open_weight_log(&self, done: usize) -> Result<std::io::BufWriter<std::fs::File>> {
        let path = self.dir.join("weights.csv");
        let mut header = "epoch,step,index,label".to_owned();
        for kind in ["logit", "feature"] {
            for p in &self.pool {
                header.push_str(&format!(",{kind}:{}", p.teacher.name()));
            }
        }
        let mut kept = header + "\n";
        if let Ok(old) = std::fs::read_to_string(&path) {
            for line in old.lines().skip(1) {
                let epoch: usize = line
                    .split(',')
                    .next()
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(usize::MAX);
                if epoch <= done {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        crate::fsio::write_atomic(&path, kept.as_bytes())?;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(std::io::BufWriter::new(f))
    }

    /// Per-class mean logit weights (for the heatmap) and the optional per-sample CSV log.
    pub(super) fn record_weights(
        &mut self,
        w: &TeacherWeights,
        labels: &Tensor,
        indices: &[usize],
        epoch: usize,
        step: u64,
    ) -> Result<()> {
        let k = self.data.num_classes();
        let onehot = labels.onehot(k).to_kind(Kind::Double); // [B, K]
        let sums = onehot
            .transpose(0, 1)
            .matmul(&w.logit.to_kind(Kind::Double)); // [K, M]
        let fsums = onehot
            .transpose(0, 1)
            .matmul(&w.feature.to_kind(Kind::Double)); // [K, M]
        let counts = onehot.sum_dim_intlist(0, false, Kind::Double); // [K]
        match &mut self.per_class {
            Some((s, f, c)) => {
                *s += sums;
                *f += fsums;
                *c += counts;
            }
            None => self.per_class = Some((sums, fsums, counts)),
        }
        if let Some(log) = &mut self.weight_log {
            let m = w.logit.size()[1] as usize;
            let wl = Vec::<f32>::try_from(&w.logit.to_device(Device::Cpu).flatten(0, -1))?;
            let wf = Vec::<f32>::try_from(&w.feature.to_device(Device::Cpu).flatten(0, -1))?;
            let lab = Vec::<i64>::try_from(&labels.to_device(Device::Cpu))?;
            for (b, idx) in indices.iter().enumerate() {
                let mut line = format!("{},{step},{idx},{}", epoch + 1, lab[b]);
                for v in wl[b * m..(b + 1) * m].iter().chain(&wf[b * m..(b + 1) * m]) {
                    line.push_str(&format!(",{v:.6}"));
                }
                writeln!(log, "{line}").context("writing weights.csv")?;
            }
        }
        Ok(())
    }
}
