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
/// How many candidates the last epoch keeps for them: more than [`KEEP`], because copies of one
/// image (a labelled sample repeated in a few-label epoch, each copy augmented on its own, is a
/// sample of its own) count once on the page.
const CANDIDATES: usize = 4 * KEEP;

/// A kept sample before its image is attached.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub index: usize,
    pub label: usize,
    pub disagreement: f64,
    /// Full pool order; `None` for a teacher not in the pool.
    pub teachers: Vec<Option<AuditTeacher>>,
}

/// Merge a batch's most disagreed-on samples into `kept` (at most `4 KEEP`, most disagreed
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
    kept.truncate(CANDIDATES);
    Ok(())
}

/// The audit with each sample's un-augmented image as a PNG (`dense`: a segmentation or
/// detection run, whose disagreement reads pooled logits): the [`KEEP`] most disagreed-on
/// candidates, one per image (a copy of an image already shown is passed over).
pub fn finish(
    kept: &[Candidate],
    train: &ImageSet,
    teachers: &[String],
    epoch: usize,
    dense: bool,
) -> Result<Audit> {
    let (c, h, w) = train.image_shape();
    let mut samples = Vec::new();
    let mut shown: Vec<ndarray::ArrayView3<u8>> = Vec::new();
    for k in kept {
        if samples.len() == KEEP {
            break;
        }
        let img = train.images.slice(ndarray::s![k.index, .., .., ..]);
        if shown.contains(&img) {
            continue;
        }
        shown.push(img);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A labelled image repeated as another sample (a few-label epoch's copies) is shown once,
    /// and the page still fills up from the candidates after it.
    #[test]
    fn a_copy_of_an_image_already_shown_is_passed_over() {
        let n = KEEP + 2;
        let mut images = ndarray::Array4::<u8>::zeros((n, 1, 2, 2));
        for i in 0..n {
            images[[i, 0, 0, 0]] = i as u8;
        }
        // Sample n - 1 is a copy of sample 0.
        images[[n - 1, 0, 0, 0]] = 0;
        let train = ImageSet::new(images, vec![0; n], 2).unwrap();
        let candidate = |index: usize, disagreement: f64| Candidate {
            index,
            label: 0,
            disagreement,
            teachers: vec![],
        };
        let mut kept = vec![candidate(0, 1.0), candidate(n - 1, 0.99)];
        kept.extend((1..n - 1).map(|i| candidate(i, 0.5 - i as f64 * 0.01)));
        let audit = finish(&kept, &train, &[], 1, false).unwrap();
        let shown: Vec<usize> = audit.samples.iter().map(|s| s.index).collect();
        assert_eq!(shown.len(), KEEP);
        assert_eq!(shown[0], 0);
        assert!(!shown.contains(&(n - 1)), "{shown:?}");
        assert_eq!(shown[1..], (1..KEEP).collect::<Vec<_>>()[..]);
    }
}
