//! Box operations on `[N, 4]` tensors of `(x1, y1, x2, y2)` pixels, as `torchvision.ops` defines
//! them (checked against its values in `tests/golden/detection.json`): areas, pairwise IoU and
//! generalised IoU, the GIoU loss, and greedy non-maximum suppression, plain and class-aware.
//!
//! NMS runs on the host: the boxes are sorted by score once and the greedy pass, as
//! torchvision's CPU kernel does it, suppresses every later box whose IoU with a kept box is
//! above the threshold. Class-aware NMS runs it per class and merges the kept boxes by score
//! (torchvision's `_batched_nms_vanilla`; its coordinate-offset trick gives the same set).

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

fn check_boxes(what: &str, b: &Tensor) -> Result<()> {
    let s = b.size();
    if s.len() != 2 || s[1] != 4 {
        return Err(Error::Invalid {
            what: what.into(),
            reason: format!("boxes must be [N, 4] (x1, y1, x2, y2), got {s:?}"),
        });
    }
    Ok(())
}

/// Areas `[N]` of boxes `[N, 4]`.
pub fn box_area(b: &Tensor) -> Result<Tensor> {
    check_boxes("box_area", b)?;
    let w = b.f_select(1, 2)? - b.f_select(1, 0)?;
    let h = b.f_select(1, 3)? - b.f_select(1, 1)?;
    Ok(w * h)
}

/// Pairwise intersection `[N, M]` and union `[N, M]`.
fn inter_union(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    check_boxes("box_iou first operand", a)?;
    check_boxes("box_iou second operand", b)?;
    let (aa, ab) = (box_area(a)?, box_area(b)?);
    let lt = a
        .f_slice(1, 0, 2, 1)?
        .f_unsqueeze(1)?
        .f_maximum(&b.f_slice(1, 0, 2, 1)?.f_unsqueeze(0)?)?;
    let rb = a
        .f_slice(1, 2, 4, 1)?
        .f_unsqueeze(1)?
        .f_minimum(&b.f_slice(1, 2, 4, 1)?.f_unsqueeze(0)?)?;
    let wh = (rb - lt).f_clamp_min(0.0)?;
    let inter = wh.f_select(2, 0)? * wh.f_select(2, 1)?;
    let union = aa.f_unsqueeze(1)? + ab.f_unsqueeze(0)? - &inter;
    Ok((inter, union))
}

/// Pairwise IoU `[N, M]` (`torchvision.ops.box_iou`).
pub fn box_iou(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (inter, union) = inter_union(a, b)?;
    Ok(inter / union)
}

/// Pairwise generalised IoU `[N, M]` (`torchvision.ops.generalized_box_iou`).
pub fn generalized_box_iou(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (inter, union) = inter_union(a, b)?;
    let iou = &inter / &union;
    let lt = a
        .f_slice(1, 0, 2, 1)?
        .f_unsqueeze(1)?
        .f_minimum(&b.f_slice(1, 0, 2, 1)?.f_unsqueeze(0)?)?;
    let rb = a
        .f_slice(1, 2, 4, 1)?
        .f_unsqueeze(1)?
        .f_maximum(&b.f_slice(1, 2, 4, 1)?.f_unsqueeze(0)?)?;
    let wh = (rb - lt).f_clamp_min(0.0)?;
    let hull = wh.f_select(2, 0)? * wh.f_select(2, 1)?;
    Ok(iou - (&hull - &union) / hull)
}

/// The GIoU loss `1 - GIoU` of aligned boxes `[..., 4]` -> `[...]`
/// (`torchvision.ops.generalized_box_iou_loss`, reduction none, eps 1e-7).
pub fn giou_loss(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.size() != b.size() || a.size().last() != Some(&4) {
        return Err(Error::Invalid {
            what: "giou_loss".into(),
            reason: format!(
                "boxes must be aligned [..., 4], got {:?} and {:?}",
                a.size(),
                b.size()
            ),
        });
    }
    let c = |t: &Tensor, i: i64| t.select(-1, i);
    let (x1, y1, x2, y2) = (c(a, 0), c(a, 1), c(a, 2), c(a, 3));
    let (x1g, y1g, x2g, y2g) = (c(b, 0), c(b, 1), c(b, 2), c(b, 3));
    let xk1 = x1.maximum(&x1g);
    let yk1 = y1.maximum(&y1g);
    let xk2 = x2.minimum(&x2g);
    let yk2 = y2.minimum(&y2g);
    let inter = (&xk2 - &xk1).clamp_min(0.0) * (&yk2 - &yk1).clamp_min(0.0);
    let inter =
        inter * xk2.gt_tensor(&xk1).to_kind(Kind::Float) * yk2.gt_tensor(&yk1).to_kind(Kind::Float);
    let union = (&x2 - &x1) * (&y2 - &y1) + (&x2g - &x1g) * (&y2g - &y1g) - &inter;
    let eps = 1e-7;
    let iou = &inter / (&union + eps);
    let xc1 = x1.minimum(&x1g);
    let yc1 = y1.minimum(&y1g);
    let xc2 = x2.maximum(&x2g);
    let yc2 = y2.maximum(&y2g);
    let hull = (xc2 - xc1) * (yc2 - yc1);
    let giou = iou - (&hull - &union) / (hull + eps);
    Ok(giou.neg() + 1.0)
}

fn host_boxes(boxes: &Tensor, scores: &Tensor) -> Result<(Vec<[f32; 4]>, Vec<f32>)> {
    check_boxes("nms", boxes)?;
    let n = boxes.size()[0];
    if scores.size() != [n] {
        return Err(Error::Invalid {
            what: "nms".into(),
            reason: format!("{n} boxes but scores of shape {:?}", scores.size()),
        });
    }
    let flat: Vec<f32> = Vec::<f32>::try_from(
        boxes
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?
            .f_view([-1])?,
    )?;
    let s: Vec<f32> = Vec::<f32>::try_from(
        scores
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?,
    )?;
    Ok((
        flat.chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect(),
        s,
    ))
}

/// Greedy NMS over host boxes restricted to `subset` (indices into `b`), sorted by decreasing
/// score: the kept indices in decreasing score.
fn greedy(b: &[[f32; 4]], s: &[f32], subset: &mut [usize], threshold: f32) -> Vec<usize> {
    // Decreasing score; ties keep the lower index first (a stable sort).
    subset.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
    let area = |x: &[f32; 4]| (x[2] - x[0]) * (x[3] - x[1]);
    let mut suppressed = vec![false; subset.len()];
    let mut keep = Vec::new();
    for a in 0..subset.len() {
        if suppressed[a] {
            continue;
        }
        let i = subset[a];
        keep.push(i);
        let bi = &b[i];
        let ai = area(bi);
        for c in a + 1..subset.len() {
            if suppressed[c] {
                continue;
            }
            let bj = &b[subset[c]];
            let w = (bi[2].min(bj[2]) - bi[0].max(bj[0])).max(0.0);
            let h = (bi[3].min(bj[3]) - bi[1].max(bj[1])).max(0.0);
            let inter = w * h;
            let iou = inter / (ai + area(bj) - inter);
            if iou > threshold {
                suppressed[c] = true;
            }
        }
    }
    keep
}

fn keep_tensor(keep: Vec<usize>, device: Device) -> Result<Tensor> {
    let v: Vec<i64> = keep.into_iter().map(|i| i as i64).collect();
    Ok(Tensor::from_slice(&v).f_to_device(device)?)
}

/// Non-maximum suppression (`torchvision.ops.nms`): the indices `[K]` (int64) of the boxes kept,
/// in decreasing score; a box is dropped when its IoU with a kept, higher-scoring box is above
/// `iou_threshold`.
///
/// # Shapes
/// `boxes [N, 4]`, `scores [N]` -> `[K]`
pub fn nms(boxes: &Tensor, scores: &Tensor, iou_threshold: f64) -> Result<Tensor> {
    let (b, s) = host_boxes(boxes, scores)?;
    let mut all: Vec<usize> = (0..b.len()).collect();
    keep_tensor(
        greedy(&b, &s, &mut all, iou_threshold as f32),
        boxes.device(),
    )
}

/// Class-aware NMS (`torchvision.ops.batched_nms`): boxes of different classes never suppress
/// each other. The kept indices `[K]` in decreasing score.
///
/// # Shapes
/// `boxes [N, 4]`, `scores [N]`, `classes [N]` (int) -> `[K]`
pub fn batched_nms(
    boxes: &Tensor,
    scores: &Tensor,
    classes: &Tensor,
    iou_threshold: f64,
) -> Result<Tensor> {
    let (b, s) = host_boxes(boxes, scores)?;
    let c: Vec<i64> = Vec::<i64>::try_from(
        classes
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Int64)?
            .f_contiguous()?,
    )?;
    if c.len() != b.len() {
        return Err(Error::Invalid {
            what: "batched_nms".into(),
            reason: format!("{} boxes but {} classes", b.len(), c.len()),
        });
    }
    let mut groups: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
    for (i, &k) in c.iter().enumerate() {
        groups.entry(k).or_default().push(i);
    }
    let mut keep: Vec<usize> = groups
        .into_values()
        .flat_map(|mut g| greedy(&b, &s, &mut g, iou_threshold as f32))
        .collect();
    keep.sort_by(|&i, &j| s[j].total_cmp(&s[i]).then(i.cmp(&j)));
    keep_tensor(keep, boxes.device())
}
