//! Ground-truth objects of an image ([`Object`]: class, box, area), the vocabulary that the
//! data readers, the loader (which flips and packs them) and the detection task share; a leaf
//! module, so that none of them imports another through it.

use std::collections::BTreeMap;

use tch::Tensor;

/// The mask value of pixels that carry no label (VOC's convention): they count in no loss and
/// no metric.
pub const IGNORE: u8 = 255;

/// The label of a whole image from its mask: the most frequent class other than 0 (class 0 is
/// the background in every layout mtkd reads), 0 when only background or nothing is labelled.
/// Ties go to the smaller class. This is what subsets stratify by and what per-class weight
/// records group images by (`segmentation::image_label`).
pub fn mask_label(mask: ndarray::ArrayView2<u8>, num_classes: usize) -> i64 {
    let mut counts = vec![0usize; num_classes.max(1)];
    for &v in mask.iter() {
        if v != IGNORE && (v as usize) < counts.len() {
            counts[v as usize] += 1;
        }
    }
    let mut best = 0usize;
    for c in 1..counts.len() {
        if counts[c] > 0 && (best == 0 || counts[c] > counts[best]) {
            best = c;
        }
    }
    best as i64
}

/// One ground-truth object of an image: class index, box `[x1, y1, x2, y2]` in pixels, area
/// (the annotation's, which COCO's size ranges use; the box's when it has none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    pub class: usize,
    pub bbox: [f32; 4],
    pub area: f32,
}

/// A batch's objects padded into one tensor `[B, N, 6]` (`N` at least 1).
pub fn pack_objects(objects: &[&[Object]]) -> Tensor {
    let n = objects.iter().map(|o| o.len()).max().unwrap_or(0).max(1);
    let mut v = vec![0f32; objects.len() * n * 6];
    for (i, objs) in objects.iter().enumerate() {
        for j in 0..n {
            let r = &mut v[(i * n + j) * 6..(i * n + j + 1) * 6];
            match objs.get(j) {
                Some(o) => {
                    r[..4].copy_from_slice(&o.bbox);
                    r[4] = o.class as f32;
                    r[5] = o.area;
                }
                None => r[4] = -1.0,
            }
        }
    }
    Tensor::from_slice(&v).view([objects.len() as i64, n as i64, 6])
}

/// The most frequent class among an image's objects (the smallest on ties; 0 for an image
/// without objects): what subsets stratify by and per-class weight records group by.
pub fn image_label(objects: &[Object]) -> i64 {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for o in objects {
        *counts.entry(o.class).or_default() += 1;
    }
    counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(c, _)| *c as i64)
        .unwrap_or(0)
}
