//! What a finished run writes besides its records: the TorchScript export and the
//! segmentation plots.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
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
    /// The pixels of test image `i` `[C, H, W]`, as the overlays draw them.
    fn test_image(&self, i: usize) -> Vec<u8> {
        self.data
            .test
            .images
            .index_axis(ndarray::Axis(0), i)
            .iter()
            .copied()
            .collect()
    }

    /// `plots/overlays.png` (a few test images: truth, student, each teacher) and
    /// `plots/class_iou.png` (the student's final IoU per class).
    pub(super) fn segmentation_plots(&self, report: &MetricReport) -> Result<()> {
        let plots = self.dir.join("plots");
        let names = &self.data.test.class_names;
        crate::plot::class_bars(
            &plots.join("class_iou.png"),
            "Student: test IoU per class (last epoch)",
            "IoU (%)",
            names,
            &report.per_class,
            true,
        )?;
        let loader = self.data.test_loader(&self.cfg.data, 4)?;
        let Some(batch) = loader.epoch(0, 0, self.step.device).next() else {
            return Ok(());
        };
        let argmax = |logits: &Tensor| -> Result<Vec<i64>> {
            Ok(Vec::<i64>::try_from(
                &logits
                    .argmax(1, false)
                    .to_device(Device::Cpu)
                    .flatten(0, -1),
            )?)
        };
        // The overlays draw a negative class as "not labelled".
        let ignore = i64::from(mtkd_vision_tasks::segmentation::IGNORE);
        let truth = Vec::<i64>::try_from(
            &self
                .step
                .task
                .targets(&batch)?
                .to_device(Device::Cpu)
                .flatten(0, -1),
        )?;
        let mut maps = vec![truth
            .into_iter()
            .map(|c| if c == ignore { -1 } else { c })
            .collect::<Vec<_>>()];
        let mut titles = vec!["truth".to_owned(), "student".to_owned()];
        maps.push(argmax(
            &tch::no_grad(|| self.step.student.forward_t(&batch.images, false)).logits,
        )?);
        for p in &self.step.pool.members {
            maps.push(argmax(&p.teacher.forward(&batch.images)?.logits)?);
            titles.push(format!("teacher {}", p.teacher.name()));
        }
        let (c, h, w) = self.data.test.image_shape();
        let per = h * w;
        let rows: Vec<crate::plot::OverlayRow> = batch
            .indices
            .iter()
            .enumerate()
            .map(|(k, &i)| crate::plot::OverlayRow {
                image: self.test_image(i),
                channels: c,
                maps: maps
                    .iter()
                    .map(|m| m[k * per..(k + 1) * per].to_vec())
                    .collect(),
            })
            .collect();
        crate::plot::segmentation_overlays(
            &plots.join("overlays.png"),
            (h, w),
            &titles,
            names,
            &rows,
        )
    }

    /// A detection run's outputs: `detections.json` (the student's test detections in COCO's
    /// result format), `plots/class_ap.png` (AP per class) and `plots/boxes.png` (a few test
    /// images: truth, student and every teacher's boxes).
    pub(super) fn detection_outputs(&self, report: &MetricReport) -> Result<()> {
        use mtkd_vision_tasks::detection::{self as det, layout::DetLayout};
        let plots = self.dir.join("plots");
        let names = &self.data.test.class_names;
        crate::plot::class_bars(
            &plots.join("class_ap.png"),
            "Student: test AP@[.5:.95] per class (last epoch)",
            "AP (%)",
            names,
            &report.per_class,
            false,
        )?;
        let side = super::detection_side(&self.cfg.data);
        let layout = DetLayout::standard((side, side));
        let k = self.data.num_classes();
        let loader = self
            .data
            .test_loader(&self.cfg.data, self.cfg.train.eval_batch_size)?;
        let mut metric = det::DetMetric::new(layout.clone(), k as usize);
        for batch in loader.epoch(0, 0, self.step.device) {
            let out = tch::no_grad(|| self.step.student.forward_t(&batch.images, false));
            metric.update_batch(&out.logits, &batch)?;
        }
        let (ids, cats) = self.data.test_coco_ids.clone().unwrap_or_default();
        det::coco::write_results(
            &self.dir.join("detections.json"),
            metric.detections(),
            &ids,
            &cats,
        )
        .context("writing detections.json")?;
        // The overlays: the first four test images.
        let loader = self.data.test_loader(&self.cfg.data, 4)?;
        let Some(batch) = loader.epoch(0, 0, self.step.device).next() else {
            return Ok(());
        };
        let shown = det::Postprocess {
            score_threshold: 0.3,
            max_detections: 15,
            ..Default::default()
        };
        let draw = |dets: Vec<Vec<det::Detection>>| -> Vec<Vec<crate::plot::DrawBox>> {
            dets.into_iter()
                .map(|d| {
                    d.into_iter()
                        .map(|d| crate::plot::DrawBox {
                            class: d.class,
                            bbox: d.bbox,
                            score: Some(d.score),
                        })
                        .collect()
                })
                .collect()
        };
        let truth = det::batch_objects(
            batch
                .targets
                .objects()
                .ok_or_else(|| anyhow!("a detection batch has no boxes"))?,
        )?;
        let mut columns: Vec<Vec<Vec<crate::plot::DrawBox>>> = vec![truth
            .into_iter()
            .map(|o| {
                o.into_iter()
                    .map(|o| crate::plot::DrawBox {
                        class: o.class,
                        bbox: o.bbox,
                        score: None,
                    })
                    .collect()
            })
            .collect()];
        let mut titles = vec!["truth".to_owned(), "student".to_owned()];
        let out = tch::no_grad(|| self.step.student.forward_t(&batch.images, false));
        columns.push(draw(det::postprocess(&layout, &out.logits, k, &shown)?));
        for p in &self.step.pool.members {
            let out = p.teacher.forward(&batch.images)?;
            columns.push(draw(det::postprocess(&layout, &out.logits, k, &shown)?));
            titles.push(format!("teacher {}", p.teacher.name()));
        }
        let (c, h, w) = self.data.test.image_shape();
        let rows: Vec<crate::plot::BoxRow> = batch
            .indices
            .iter()
            .enumerate()
            .map(|(r, &i)| crate::plot::BoxRow {
                image: self.test_image(i),
                channels: c,
                boxes: columns.iter().map(|col| col[r].clone()).collect(),
            })
            .collect();
        crate::plot::detection_overlays(&plots.join("boxes.png"), (h, w), &titles, names, &rows)
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
