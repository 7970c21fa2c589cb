//! Object detection (docs/METHOD.md, section 14): mtkd's anchor-free one-stage detector layout
//! and FCOS assignment ([`layout`]), box operations and class-aware NMS ([`boxes`]), the head's
//! losses and the detection KD terms ([`loss`]), COCO-style AP ([`eval`]) and COCO-JSON
//! datasets and result files ([`coco`]).

pub mod boxes;
pub mod coco;
pub mod eval;
pub mod layout;
pub mod loss;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::loader::Batch;
use eval::{CocoStats, DetBox, GtBox};
use layout::DetLayout;

pub use crate::objects::{pack_objects, Object};

/// Post-processing of a detector's output into detections (torchvision's FCOS defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Postprocess {
    /// Candidates need `sqrt(p_class * p_centerness)` above this.
    pub score_threshold: f64,
    /// At most this many candidates per image go into NMS.
    pub top_candidates: i64,
    /// Class-aware NMS IoU threshold.
    pub nms_threshold: f64,
    /// Detections kept per image.
    pub max_detections: usize,
}

impl Default for Postprocess {
    fn default() -> Self {
        Postprocess {
            score_threshold: 0.05,
            top_candidates: 1000,
            nms_threshold: 0.6,
            max_detections: 100,
        }
    }
}

/// A detection in pixels: class index, `[x1, y1, x2, y2]`, score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub class: usize,
    pub bbox: [f32; 4],
    pub score: f32,
}

/// The detections of every image of a detector output `[B, K + 5, L]`, best first.
pub fn postprocess(
    layout: &DetLayout,
    out: &Tensor,
    num_classes: i64,
    pp: &Postprocess,
) -> Result<Vec<Vec<Detection>>> {
    tch::no_grad(|| {
        let (boxes, probs, ctr) = layout.decode(&out.detach(), num_classes)?;
        let scores = (probs * ctr.unsqueeze(-1)).sqrt(); // [B, L, K]
        let b = out.size()[0];
        let mut all = Vec::with_capacity(b as usize);
        for i in 0..b {
            let s = scores.get(i).flatten(0, 1).to_device(Device::Cpu); // [L * K]
            let keep = s.gt(pp.score_threshold).nonzero().squeeze_dim(1);
            let mut dets = Vec::new();
            if keep.numel() > 0 {
                let cand = s.index_select(0, &keep);
                let n = (cand.numel() as i64).min(pp.top_candidates);
                let (top, order) = cand.topk(n, 0, true, true);
                let flat = keep.index_select(0, &order);
                let loc = flat.divide_scalar_mode(num_classes, "floor");
                let cls = flat.remainder(num_classes);
                let bx = boxes.get(i).to_device(Device::Cpu).index_select(0, &loc);
                let kept = boxes::batched_nms(&bx, &top, &cls, pp.nms_threshold)?;
                let kept: Vec<i64> = Vec::<i64>::try_from(&kept)?;
                let bx: Vec<f32> = Vec::<f32>::try_from(bx.to_kind(Kind::Float).flatten(0, -1))?;
                let top: Vec<f32> = Vec::<f32>::try_from(top.to_kind(Kind::Float))?;
                let cls: Vec<i64> = Vec::<i64>::try_from(&cls)?;
                for &j in kept.iter().take(pp.max_detections) {
                    let j = j as usize;
                    dets.push(Detection {
                        class: cls[j] as usize,
                        bbox: [bx[4 * j], bx[4 * j + 1], bx[4 * j + 2], bx[4 * j + 3]],
                        score: top[j],
                    });
                }
            }
            all.push(dets);
        }
        Ok(all)
    })
}

/// The ground truth of a batch `[B, N, 6]` (`x1, y1, x2, y2, class, area`, class `-1` for
/// padding) as objects per image.
pub fn batch_objects(gt: &Tensor) -> Result<Vec<Vec<Object>>> {
    let s = gt.size();
    if s.len() != 3 || s[2] != 6 {
        return Err(Error::Invalid {
            what: "detection batch".into(),
            reason: format!("expected boxes [B, N, 6], got {s:?}"),
        });
    }
    let v: Vec<f32> = Vec::<f32>::try_from(
        gt.to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .flatten(0, -1),
    )?;
    let (b, n) = (s[0] as usize, s[1] as usize);
    Ok((0..b)
        .map(|i| {
            (0..n)
                .filter_map(|j| {
                    let r = &v[(i * n + j) * 6..(i * n + j + 1) * 6];
                    (r[4] >= 0.0).then(|| Object {
                        class: r[4].round() as usize,
                        bbox: [r[0], r[1], r[2], r[3]],
                        area: r[5],
                    })
                })
                .collect()
        })
        .collect())
}

fn xywh(b: [f32; 4]) -> [f64; 4] {
    let [x1, y1, x2, y2] = b.map(f64::from);
    [x1, y1, x2 - x1, y2 - y1]
}

/// COCO AP over evaluation batches: the ground truth of each batch's boxes and the
/// post-processed detections of the output, evaluated at the end ([`eval::evaluate`]).
#[derive(Debug)]
pub struct DetMetric {
    layout: DetLayout,
    num_classes: usize,
    pp: Postprocess,
    gts: Vec<GtBox>,
    dets: Vec<DetBox>,
}

impl DetMetric {
    pub fn new(layout: DetLayout, num_classes: usize) -> DetMetric {
        DetMetric {
            layout,
            num_classes,
            pp: Postprocess::default(),
            gts: Vec::new(),
            dets: Vec::new(),
        }
    }

    /// Add a batch's output `[B, K + 5, L]` with its ground truth `[B, N, 6]`; images are
    /// identified by `ids`.
    pub fn update_boxes(&mut self, out: &Tensor, gt: &Tensor, ids: &[usize]) -> Result<()> {
        let objects = batch_objects(gt)?;
        let dets = postprocess(&self.layout, out, self.num_classes as i64, &self.pp)?;
        for ((objs, ds), &id) in objects.iter().zip(&dets).zip(ids) {
            for o in objs {
                self.gts.push(GtBox {
                    image: id as u64,
                    category: o.class,
                    bbox: xywh(o.bbox),
                    area: f64::from(o.area),
                });
            }
            for d in ds {
                self.dets.push(DetBox {
                    image: id as u64,
                    category: d.class,
                    bbox: xywh(d.bbox),
                    score: f64::from(d.score),
                });
            }
        }
        Ok(())
    }

    /// COCOeval's numbers over everything added.
    pub fn stats(&self) -> CocoStats {
        eval::evaluate(&self.gts, &self.dets, self.num_classes)
    }

    /// The detections added so far (image = the ids given to [`DetMetric::update_boxes`]).
    pub fn detections(&self) -> &[DetBox] {
        &self.dets
    }

    /// Update from a batch that carries boxes.
    pub fn update_batch(&mut self, out: &Tensor, batch: &Batch) -> Result<()> {
        let gt = batch.targets.objects().ok_or_else(|| Error::Invalid {
            what: "batch".into(),
            reason: "a detection batch carries no boxes (the dataset has none)".into(),
        })?;
        self.update_boxes(out, gt, &batch.indices)
    }
}

/// Percent of a COCO number, NaN where COCO says -1 (no ground truth).
pub fn percent(x: f64) -> f64 {
    if x < 0.0 {
        f64::NAN
    } else {
        100.0 * x
    }
}
