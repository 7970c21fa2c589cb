//! `audit.json`: during a run's last epoch, the training samples on which the active teachers
//! disagree most (generalised Jensen-Shannon divergence of their softmax outputs at T = 1,
//! `H(mean_m p_m) - mean_m H(p_m)`), with what each teacher predicted and the weights it got.
//! The audit page (`report.html`) shows them with their images.

use std::io::Cursor;

use anyhow::{Context, Result};
use base64::Engine as _;
use tch::{Device, Kind, Tensor};

use crate::record::{Audit, AuditSample, AuditTeacher};
use mtkd_distill_core::signals::BatchSignals;
use mtkd_distill_core::weighting::TeacherWeights;
use mtkd_vision_tasks::data::ImageSet;

/// How many samples the audit keeps.
pub const KEEP: usize = 12;

/// A kept sample before its image is attached.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub index: usize,
    pub label: usize,
    pub disagreement: f64,
    /// Full pool order; `None` for a teacher not in the pool.
    pub teachers: Vec<Option<AuditTeacher>>,
}

/// Merge a batch's most disagreed-on samples into `kept` (at most [`KEEP`], most disagreed
/// first; ties by sample index, so the choice is deterministic). `full` are the batch's weights
/// in full pool order, `active` the pool positions of the signals' teachers.
pub fn collect(
    kept: &mut Vec<Candidate>,
    s: &BatchSignals,
    full: &TeacherWeights,
    active: &[usize],
    indices: &[usize],
) -> Result<()> {
    if s.teacher_logits.len() < 2 {
        return Ok(());
    }
    let (dis, probs) = tch::no_grad(|| {
        let p: Vec<Tensor> = s
            .teacher_logits
            .iter()
            .map(|z| z.to_kind(Kind::Float).softmax(1, Kind::Float))
            .collect();
        let h = |q: &Tensor| -(q * q.clamp_min(1e-12).log()).sum_dim_intlist(1, false, Kind::Float);
        let stacked = Tensor::stack(&p, 0); // [M, B, K]
        let mean = stacked.mean_dim(0, false, Kind::Float);
        let mean_h =
            Tensor::stack(&p.iter().map(h).collect::<Vec<_>>(), 0).mean_dim(0, false, Kind::Float);
        (h(&mean) - mean_h, stacked)
    });
    let b = indices.len() as i64;
    let k = (KEEP as i64).min(b);
    let (_, top) = dis.topk(k, 0, true, true);
    let top: Vec<i64> = Vec::try_from(&top.to_device(Device::Cpu))?;
    let host = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(Vec::try_from(
            &t.to_kind(Kind::Double)
                .to_device(Device::Cpu)
                .flatten(0, -1),
        )?)
    };
    let dis = host(&dis)?;
    let labels: Vec<i64> = Vec::try_from(&s.labels.to_device(Device::Cpu))?;
    let pred: Vec<i64> =
        Vec::try_from(&probs.argmax(2, false).to_device(Device::Cpu).flatten(0, -1))?;
    let probs_v = host(&probs)?;
    let wl = host(&full.logit)?;
    let wf = host(&full.feature)?;
    let (mf, kk) = (full.logit.size()[1] as usize, probs.size()[2] as usize);
    for &row in &top {
        let r = row as usize;
        let y = labels[r] as usize;
        let mut teachers = vec![None; mf];
        for (j, &pos) in active.iter().enumerate() {
            teachers[pos] = Some(AuditTeacher {
                predicted: pred[j * b as usize + r] as usize,
                prob_true: probs_v[(j * b as usize + r) * kk + y],
                logit_weight: wl[r * mf + pos],
                feature_weight: wf[r * mf + pos],
            });
        }
        kept.push(Candidate {
            index: indices[r],
            label: y,
            disagreement: dis[r],
            teachers,
        });
    }
    kept.sort_by(|a, b| {
        b.disagreement
            .total_cmp(&a.disagreement)
            .then(a.index.cmp(&b.index))
    });
    kept.dedup_by_key(|c| c.index);
    kept.truncate(KEEP);
    Ok(())
}

/// The audit with each sample's un-augmented image as a PNG (`dense`: a segmentation or
/// detection run, whose disagreement reads pooled logits).
pub fn finish(
    kept: &[Candidate],
    train: &ImageSet,
    teachers: &[String],
    epoch: usize,
    dense: bool,
) -> Result<Audit> {
    let (c, h, w) = train.image_shape();
    let mut samples = Vec::new();
    for k in kept {
        let img = train.images.slice(ndarray::s![k.index, .., .., ..]);
        let mut png = Vec::new();
        let buf: Vec<u8> = (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| (0..c).map(move |ch| (y, x, ch))))
            .map(|(y, x, ch)| img[[ch, y, x]])
            .collect();
        let color = if c == 1 {
            image::ExtendedColorType::L8
        } else {
            image::ExtendedColorType::Rgb8
        };
        image::ImageEncoder::write_image(
            image::codecs::png::PngEncoder::new(Cursor::new(&mut png)),
            &buf,
            w as u32,
            h as u32,
            color,
        )
        .with_context(|| format!("encoding training image {} for audit.json", k.index))?;
        samples.push(AuditSample {
            index: k.index,
            label: k.label,
            image_png_base64: base64::engine::general_purpose::STANDARD.encode(&png),
            disagreement: k.disagreement,
            teachers: k.teachers.clone(),
        });
    }
    Ok(Audit {
        teachers: teachers.to_vec(),
        class_names: train.class_names.clone(),
        epoch,
        measure: if dense {
            "generalised Jensen-Shannon divergence of the softmax of the teachers' logits pooled over the image (T = 1): H(mean p_m) - mean H(p_m), in nats".into()
        } else {
            "generalised Jensen-Shannon divergence of the teachers' softmax outputs (T = 1): H(mean p_m) - mean H(p_m), in nats".into()
        },
        samples,
        overlays_png_base64: None,
    })
}

/// How many of the audit's samples its overlay picture shows.
pub const PICTURED: usize = 6;

/// The PNG, base64, of a picture the task draws (`overlays.png` or `boxes.png` written into
/// `dir`), or `None` when it drew none.
pub fn picture_base64(dir: &std::path::Path) -> Result<Option<String>> {
    for name in ["overlays.png", "boxes.png"] {
        let p = dir.join(name);
        if p.is_file() {
            let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            return Ok(Some(
                base64::engine::general_purpose::STANDARD.encode(bytes),
            ));
        }
    }
    Ok(None)
}
