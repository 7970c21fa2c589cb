//! What a finished run writes besides its records: the TorchScript export and what its task
//! draws and writes of its test predictions.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use mtkd_student::Network;
use mtkd_vision_tasks::task::MetricReport;

use super::step::DistillStep;
use crate::config::Config;
use crate::dataset::Datasets;

/// A finished run, as its end-of-run outputs see it.
pub(super) struct FinishedRun<'r> {
    pub(super) cfg: &'r Config,
    pub(super) data: &'r Datasets,
    pub(super) dir: &'r Path,
    pub(super) step: &'r DistillStep,
}

impl FinishedRun<'_> {
    /// What a finished run draws and writes of its task's test predictions, as the task and
    /// its metric say: the bar chart of the final value per class, a picture of the first test
    /// images (truth, student, every teacher), and the metric's individual results.
    pub(super) fn task_outputs(&self, report: &MetricReport) -> Result<()> {
        let plots = self.dir.join("plots");
        let names = &self.data.test.class_names;
        if let Some(c) = report.kind().per_class_chart {
            crate::plot::class_bars(
                &plots.join(c.file),
                c.title,
                c.axis,
                names,
                &report.per_class,
                c.background,
            )?;
        }
        self.picture(&plots)?;
        self.results()
    }

    /// The task's picture of the first four test images.
    fn picture(&self, plots: &Path) -> Result<()> {
        let loader = self.data.test_loader(&self.cfg.data, 4)?;
        self.draw(&loader, &self.data.test, plots).map(|_| ())
    }

    /// The task's picture of the training images at `indices`, un-augmented (the audit's
    /// most disagreed-on samples), into `dir`; `false` when the task draws none.
    pub(super) fn train_picture(&self, indices: &[usize], dir: &Path) -> Result<bool> {
        if indices.is_empty() {
            return Ok(false);
        }
        let set = std::sync::Arc::new(self.data.train.select(indices));
        let loader =
            self.data
                .eval_loader(&self.cfg.data, std::sync::Arc::clone(&set), indices.len())?;
        self.draw(&loader, &set, dir)
    }

    /// Draw the first batch of `loader` over `set`: truth, student, every teacher.
    fn draw(
        &self,
        loader: &mtkd_vision_tasks::loader::BatchLoader,
        set: &mtkd_vision_tasks::data::ImageSet,
        plots: &Path,
    ) -> Result<bool> {
        let task = self.step.task();
        let Some(batch) = loader.epoch(0, 0, self.step.device).next() else {
            return Ok(false);
        };
        let mut logits =
            vec![tch::no_grad(|| self.step.student().forward_t(&batch.images, false)).logits];
        let mut titles = vec!["truth".to_owned(), "student".to_owned()];
        for p in &self.step.pool.members {
            logits.push(p.teacher.forward(&batch.images)?.logits);
            titles.push(format!("teacher {}", p.teacher.name()));
        }
        let Some(picture) = task.picture(&batch, &logits)? else {
            return Ok(false);
        };
        let (c, h, w) = set.image_shape();
        let images: Vec<Vec<u8>> = batch
            .indices
            .iter()
            .map(|&i| {
                set.images
                    .index_axis(ndarray::Axis(0), i)
                    .iter()
                    .copied()
                    .collect()
            })
            .collect();
        crate::plot::draw_picture(
            plots,
            ((h, w), c),
            &images,
            &titles,
            &set.class_names,
            &picture,
        )?;
        Ok(true)
    }

    /// The metric's individual results of the student on the test split (detection:
    /// `detections.json` in COCO's result format, with the data's COCO ids when it has them).
    fn results(&self) -> Result<()> {
        let task = self.step.task();
        let mut metric = task.metric(self.data.train.num_classes);
        let Some(file) = metric.result_file() else {
            return Ok(());
        };
        let loader = self
            .data
            .test_loader(&self.cfg.data, self.cfg.train.eval_batch_size)?;
        super::evaluate_into(
            &|x| Ok(self.step.student().forward_t(x, false)),
            &loader,
            self.step.device,
            task,
            metric.as_mut(),
        )?;
        metric
            .write_results(&self.dir.join(file), self.data.test_coco_ids.as_ref())
            .with_context(|| format!("writing {file}"))
    }
}

/// Export the student as TorchScript (logits output: tracing supports a single return value).
/// The weights are copied into a frozen CPU copy of the network, so the file is portable and
/// the traced graph holds constants, not trainable parameters.
pub fn export_torchscript(net: &Network, vs: &VarStore, path: PathBuf) -> Result<()> {
    let (c, h, w) = net.in_shape();
    let mut frozen = VarStore::new(Device::Cpu);
    let copy = Network::with_head(
        &frozen.root(),
        net.arch,
        net.head_kind,
        net.in_shape(),
        net.num_classes(),
    )?;
    frozen
        .copy(vs)
        .context("copying the student's weights for export")?;
    frozen.freeze();
    let example = Tensor::zeros([1, c, h, w], (Kind::Float, Device::Cpu));
    let module = tch::no_grad(|| {
        tch::CModule::create_by_tracing("MtkdStudent", "forward", &[example], &mut |xs| {
            vec![copy.forward_t(&xs[0], false).logits]
        })
    })
    .context("tracing the student for TorchScript export")?;
    // libtorch aborts the process (an exception thrown while unwinding) when the disk fills
    // during its write: check the room first. The file holds the weights once, plus the graph.
    let weights: i64 = frozen
        .variables()
        .values()
        .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
        .sum();
    crate::fsio::ensure_room(&path, 2 * weights as u64 + (4 << 20))?;
    crate::fsio::write_atomic_with(&path, |tmp| {
        module.save(tmp).map_err(|e| e.to_string().into())
    })?;
    Ok(())
}
