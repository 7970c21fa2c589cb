//! Synthetic scenes with exact masks: objects of a classification set (Fashion-MNIST items,
//! digits) pasted at random positions and scales onto textured canvases. Class 0 is the
//! background, an object of class `c` is class `c + 1`; a pixel belongs to an object where the
//! object's own (resampled) intensity exceeds [`OBJECT_THRESHOLD`], and later objects occlude
//! earlier ones. Scene `i` depends only on `(seed, i)` and the source set, so a set is the same
//! on every machine and run.

use ndarray::{Array3, Array4};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::image_label;
use crate::data::{Annotations, ImageSet};
use crate::error::{Error, Result};

/// Intensity (0..255) above which a pasted object's pixel is the object.
pub const OBJECT_THRESHOLD: u8 = 40;

/// How scenes are made (`[data] scenes = { ... }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SceneConfig {
    /// Scenes in the training split (objects from the source's training split).
    pub train: usize,
    /// Scenes in the test split (objects from the source's test split).
    pub test: usize,
    /// Canvas side in pixels.
    #[serde(default = "default_size")]
    pub size: usize,
    /// Objects per scene, inclusive range.
    #[serde(default = "default_objects")]
    pub objects: [usize; 2],
    /// Object side as a multiple of the source image's side, range.
    #[serde(default = "default_scale")]
    pub scale: [f32; 2],
    /// Generator seed (independent of the run seed: every run of a comparison sees the same
    /// scenes).
    #[serde(default)]
    pub seed: u64,
}

fn default_size() -> usize {
    64
}
fn default_objects() -> [usize; 2] {
    [1, 3]
}
fn default_scale() -> [f32; 2] {
    [0.8, 1.6]
}

impl SceneConfig {
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.size < 8 {
            return Err(format!("size {} is below 8 pixels", self.size));
        }
        if self.objects[0] > self.objects[1] || self.objects[1] == 0 {
            return Err(format!(
                "objects {:?} is not a range lo <= hi with hi >= 1",
                self.objects
            ));
        }
        if !(self.scale[0] > 0.0 && self.scale[0] <= self.scale[1]) {
            return Err(format!(
                "scale {:?} is not a range 0 < lo <= hi",
                self.scale
            ));
        }
        if self.train == 0 || self.test == 0 {
            return Err("train and test need at least one scene each".into());
        }
        Ok(())
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A detection object keeps at least this many visible pixels (fewer: left out, counted).
pub const MIN_VISIBLE: usize = 12;

/// `n` scenes from the objects of `source` (one channel), seeded by `seed` (give the train
/// and test splits different seeds).
pub fn generate(source: &ImageSet, n: usize, cfg: &SceneConfig, seed: u64) -> Result<ImageSet> {
    Ok(scenes(source, n, cfg, seed)?.0)
}

/// The same scenes as [`generate`] for detection: the box of every object's visible pixels
/// (class = the source's class, no background class; area = the visible pixel count), no
/// masks. Objects occluded down to fewer than [`MIN_VISIBLE`] pixels are left out; how many is
/// logged and returned.
pub fn generate_detection(
    source: &ImageSet,
    n: usize,
    cfg: &SceneConfig,
    seed: u64,
) -> Result<(ImageSet, usize)> {
    let (seg, objects, dropped) = scenes(source, n, cfg, seed)?;
    let labels = objects
        .iter()
        .map(|o| crate::objects::image_label(o))
        .collect();
    let mut set = ImageSet::new(seg.images, labels, source.num_classes)?;
    set.class_names = source.class_names.clone();
    set.annotations = Annotations::Objects(objects);
    if dropped > 0 {
        tracing::info!(
            dropped,
            scenes = n,
            min_visible = MIN_VISIBLE,
            "synthetic detection scenes: objects occluded below the visible minimum were left out"
        );
    }
    Ok((set, dropped))
}

type Scenes = (ImageSet, Vec<Vec<crate::objects::Object>>, usize);

fn scenes(source: &ImageSet, n: usize, cfg: &SceneConfig, seed: u64) -> Result<Scenes> {
    cfg.check().map_err(|reason| Error::Invalid {
        what: "data.scenes".into(),
        reason,
    })?;
    let (c, sh, sw) = source.image_shape();
    if c != 1 || source.is_empty() {
        return Err(Error::Invalid {
            what: "data.scenes".into(),
            reason: format!(
                "scenes paste single-channel objects; the source has {c} channel(s) and {} images",
                source.len()
            ),
        });
    }
    let k = source.num_classes + 1;
    if k > super::IGNORE as usize {
        return Err(Error::Invalid {
            what: "data.scenes".into(),
            reason: format!("{k} classes do not fit an 8-bit mask"),
        });
    }
    let s = cfg.size;
    let mut images = Array4::<u8>::zeros((n, 1, s, s));
    let mut masks = Array3::<u8>::zeros((n, s, s));
    let mut labels = Vec::with_capacity(n);
    let mut objects = Vec::with_capacity(n);
    let mut dropped = 0;
    for i in 0..n {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ mix(i as u64)));
        // Texture: two gratings of random frequency, phase and orientation, and pixel noise,
        // in the dark range where objects' faint parts also live.
        let mut canvas = vec![0f32; s * s];
        let base = rng.gen_range(10.0f32..60.0);
        let waves: Vec<(f32, f32, f32, f32)> = (0..2)
            .map(|_| {
                let theta = rng.gen_range(0.0f32..std::f32::consts::PI);
                let freq = rng.gen_range(0.1f32..0.8);
                (
                    freq * theta.cos(),
                    freq * theta.sin(),
                    rng.gen_range(0.0f32..6.3),
                    rng.gen_range(5.0f32..30.0),
                )
            })
            .collect();
        for y in 0..s {
            for x in 0..s {
                let mut v = base;
                for &(fx, fy, ph, amp) in &waves {
                    v += amp * (fx * x as f32 + fy * y as f32 + ph).sin();
                }
                v += rng.gen_range(-15.0f32..15.0);
                canvas[y * s + x] = v.clamp(0.0, 120.0);
            }
        }
        let mut mask = vec![0u8; s * s];
        // Which object (1-based, 0 = none) every pixel shows.
        let mut instance = vec![0u16; s * s];
        let count = rng.gen_range(cfg.objects[0]..=cfg.objects[1]);
        let mut classes = Vec::with_capacity(count);
        for o in 0..count {
            let j = rng.gen_range(0..source.len());
            let class = source.labels[j] as u8 + 1;
            classes.push(source.labels[j] as usize);
            let zoom = if cfg.scale[1] > cfg.scale[0] {
                rng.gen_range(cfg.scale[0]..cfg.scale[1])
            } else {
                cfg.scale[0]
            };
            let side_h = ((sh as f32 * zoom).round() as usize).clamp(2, s);
            let side_w = ((sw as f32 * zoom).round() as usize).clamp(2, s);
            let top = rng.gen_range(0..=s - side_h);
            let left = rng.gen_range(0..=s - side_w);
            let contrast = rng.gen_range(0.7f32..1.0);
            let item = source.images.index_axis(ndarray::Axis(0), j);
            for y in 0..side_h {
                // Nearest-neighbour resampling keeps the mask exactly the object's pixels.
                let sy = (y * sh / side_h).min(sh - 1);
                for x in 0..side_w {
                    let sx = (x * sw / side_w).min(sw - 1);
                    let v = item[[0, sy, sx]];
                    if v > OBJECT_THRESHOLD {
                        let at = (top + y) * s + left + x;
                        canvas[at] = (f32::from(v) * contrast).max(f32::from(OBJECT_THRESHOLD));
                        mask[at] = class;
                        instance[at] = o as u16 + 1;
                    }
                }
            }
        }
        // Box and pixel count of every object's visible pixels.
        let mut ext = vec![(usize::MAX, usize::MAX, 0usize, 0usize, 0usize); count];
        for y in 0..s {
            for x in 0..s {
                let o = instance[y * s + x];
                if o > 0 {
                    let e = &mut ext[o as usize - 1];
                    e.0 = e.0.min(x);
                    e.1 = e.1.min(y);
                    e.2 = e.2.max(x + 1);
                    e.3 = e.3.max(y + 1);
                    e.4 += 1;
                }
            }
        }
        let mut objs = Vec::with_capacity(count);
        for (e, &class) in ext.iter().zip(&classes) {
            if e.4 < MIN_VISIBLE {
                dropped += 1;
                continue;
            }
            objs.push(crate::objects::Object {
                class,
                bbox: [e.0 as f32, e.1 as f32, e.2 as f32, e.3 as f32],
                area: e.4 as f32,
            });
        }
        objects.push(objs);
        for (d, v) in images
            .slice_mut(ndarray::s![i, 0, .., ..])
            .iter_mut()
            .zip(&canvas)
        {
            *d = v.round() as u8;
        }
        let m = ndarray::ArrayView2::from_shape((s, s), &mask).map_err(|e| Error::Invalid {
            what: "data.scenes".into(),
            reason: e.to_string(),
        })?;
        labels.push(image_label(m, k));
        masks.slice_mut(ndarray::s![i, .., ..]).assign(&m);
    }
    let mut set = ImageSet::new(images, labels, k)?;
    set.class_names = std::iter::once("background".to_owned())
        .chain(source.class_names.iter().cloned())
        .collect();
    set.annotations = Annotations::Masks(masks);
    Ok((set, objects, dropped))
}
