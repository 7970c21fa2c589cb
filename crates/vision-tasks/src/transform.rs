//! Image transforms on `u8` CHW images, producing normalised `f32`: random crop with zero
//! padding, horizontal flip, random resized crop (ImageNet-style), resize + centre crop, and
//! per-channel normalisation. Randomness comes from the caller's RNG, so a loader decides seeding.

use ndarray::ArrayView3;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Training-time augmentation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Random crop of the original size after zero-padding by this many pixels (0 = off).
    #[serde(default)]
    pub crop_padding: usize,
    /// Flip horizontally with probability 0.5.
    #[serde(default)]
    pub hflip: bool,
    /// ImageNet-style random resized crop (scale 0.08..1, ratio 3/4..4/3) to this size.
    #[serde(default)]
    pub random_resized_crop: Option<usize>,
    /// Segmentation only: a random zoom by a factor drawn uniformly from `[lo, hi]`, applied
    /// to image and mask together (then `crop_padding`'s shift and the flip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<[f32; 2]>,
}

impl Augment {
    /// Whether an image can come out differently from one epoch to the next.
    pub fn is_random(&self) -> bool {
        self.crop_padding > 0
            || self.hflip
            || self.random_resized_crop.is_some()
            || self.scale.is_some()
    }
}

/// Evaluation-time geometry: resize the shorter side then centre-crop (ImageNet-style).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalResize {
    pub resize: usize,
    pub crop: usize,
}

/// Per-channel normalisation `(x / 255 - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalize {
    /// Check against the channel count.
    pub fn check(&self, channels: usize) -> Result<(), String> {
        if self.mean.len() != channels || self.std.len() != channels {
            return Err(format!(
                "normalisation has {} means and {} stds, the images have {channels} channels",
                self.mean.len(),
                self.std.len()
            ));
        }
        if self.std.iter().any(|s| *s <= 0.0 || !s.is_finite()) {
            return Err("every std must be positive".into());
        }
        Ok(())
    }
}

/// Bilinear sample of channel `c` at fractional coordinates (half-pixel centres).
fn bilinear(img: &ArrayView3<u8>, c: usize, y: f32, x: f32) -> f32 {
    let (_, h, w) = img.dim();
    let y = (y - 0.5).clamp(0.0, (h - 1) as f32);
    let x = (x - 0.5).clamp(0.0, (w - 1) as f32);
    let (y0, x0) = (y.floor() as usize, x.floor() as usize);
    let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
    let (dy, dx) = (y - y0 as f32, x - x0 as f32);
    let p = |yy: usize, xx: usize| f32::from(img[[c, yy, xx]]);
    p(y0, x0) * (1.0 - dy) * (1.0 - dx)
        + p(y0, x1) * (1.0 - dy) * dx
        + p(y1, x0) * dy * (1.0 - dx)
        + p(y1, x1) * dy * dx
}

/// Resample the window `(top, left, height, width)` of `img` to `out x out` into `dst` (CHW).
fn resample(
    img: &ArrayView3<u8>,
    win: (f32, f32, f32, f32),
    out: usize,
    flip: bool,
    dst: &mut [f32],
) {
    let (c_n, _, _) = img.dim();
    let (top, left, wh, ww) = win;
    for c in 0..c_n {
        for oy in 0..out {
            let y = top + (oy as f32 + 0.5) * wh / out as f32;
            for ox in 0..out {
                let sx = if flip { out - 1 - ox } else { ox };
                let x = left + (sx as f32 + 0.5) * ww / out as f32;
                dst[(c * out + oy) * out + ox] = bilinear(img, c, y, x);
            }
        }
    }
}

/// Output side length `(H, W)` of the pipeline for an input of `(H, W)`.
pub fn output_size(
    hw: (usize, usize),
    augment: Option<&Augment>,
    eval: Option<&EvalResize>,
) -> (usize, usize) {
    if let Some(s) = augment.and_then(|a| a.random_resized_crop) {
        return (s, s);
    }
    if let Some(e) = eval {
        return (e.crop, e.crop);
    }
    hw
}

/// Apply the training augmentation (or the evaluation geometry when `augment` is `None`),
/// writing raw 0..255 values into `dst` (CHW, length `C * H' * W'`).
pub fn apply<R: Rng>(
    img: ArrayView3<u8>,
    augment: Option<&Augment>,
    eval: Option<&EvalResize>,
    rng: &mut R,
    dst: &mut [f32],
) {
    let (c_n, h, w) = img.dim();
    if let Some(a) = augment {
        let flip = a.hflip && rng.gen_bool(0.5);
        if let Some(out) = a.random_resized_crop {
            let win = random_resized_window(h, w, rng);
            resample(&img, win, out, flip, dst);
            return;
        }
        let pad = a.crop_padding as i64;
        let (dy, dx) = if pad > 0 {
            (rng.gen_range(-pad..=pad), rng.gen_range(-pad..=pad))
        } else {
            (0, 0)
        };
        for c in 0..c_n {
            for y in 0..h {
                let sy = y as i64 + dy;
                for x in 0..w {
                    let ox = if flip { w - 1 - x } else { x };
                    let sx = ox as i64 + dx;
                    let v = if sy >= 0 && sy < h as i64 && sx >= 0 && sx < w as i64 {
                        f32::from(img[[c, sy as usize, sx as usize]])
                    } else {
                        0.0
                    };
                    dst[(c * h + y) * w + x] = v;
                }
            }
        }
        return;
    }
    if let Some(e) = eval {
        // Resize the shorter side to `resize`, then take the central `crop` square.
        let scale = e.resize as f32 / h.min(w) as f32;
        let win_side = e.crop as f32 / scale;
        let top = (h as f32 - win_side) / 2.0;
        let left = (w as f32 - win_side) / 2.0;
        resample(&img, (top, left, win_side, win_side), e.crop, false, dst);
        return;
    }
    for (d, s) in dst.iter_mut().zip(img.iter()) {
        *d = f32::from(*s);
    }
}

/// torchvision's RandomResizedCrop window: scale (0.08, 1), log-uniform ratio (3/4, 4/3),
/// ten tries, then the centre crop fallback.
fn random_resized_window<R: Rng>(h: usize, w: usize, rng: &mut R) -> (f32, f32, f32, f32) {
    let area = (h * w) as f32;
    for _ in 0..10 {
        let target = area * rng.gen_range(0.08f32..1.0);
        let log_r = rng.gen_range((3.0f32 / 4.0).ln()..(4.0f32 / 3.0).ln());
        let ratio = log_r.exp();
        let ww = (target * ratio).sqrt().round();
        let hh = (target / ratio).sqrt().round();
        if ww >= 1.0 && hh >= 1.0 && ww <= w as f32 && hh <= h as f32 {
            let top = rng.gen_range(0..=(h - hh as usize)) as f32;
            let left = rng.gen_range(0..=(w - ww as usize)) as f32;
            return (top, left, hh, ww);
        }
    }
    let side = h.min(w) as f32;
    ((h as f32 - side) / 2.0, (w as f32 - side) / 2.0, side, side)
}

/// Segmentation's joint transform of an image and its mask, at the image's own size: a zoom by
/// a factor from `augment.scale`, a shift of up to `crop_padding` pixels beyond the zoomed
/// window, and a horizontal flip, all drawn from `rng`. The image is sampled bilinearly (0
/// outside), the mask by nearest neighbour (`ignore` outside). Without `augment` both are
/// copied.
pub fn apply_joint<R: Rng>(
    img: ArrayView3<u8>,
    mask: ndarray::ArrayView2<u8>,
    augment: Option<&Augment>,
    ignore: u8,
    rng: &mut R,
    dst: &mut [f32],
    dst_mask: &mut [i64],
) {
    let (c_n, h, w) = img.dim();
    let Some(a) = augment else {
        for (d, s) in dst.iter_mut().zip(img.iter()) {
            *d = f32::from(*s);
        }
        for (d, s) in dst_mask.iter_mut().zip(mask.iter()) {
            *d = i64::from(*s);
        }
        return;
    };
    let flip = a.hflip && rng.gen_bool(0.5);
    let zoom = match a.scale {
        Some([lo, hi]) if hi > lo => rng.gen_range(lo..hi),
        Some([lo, _]) => lo,
        None => 1.0,
    };
    let (wh, ww) = (h as f32 / zoom, w as f32 / zoom);
    let pad = a.crop_padding as f32;
    let range = |extent: f32, win: f32, rng: &mut R| {
        let (lo, hi) = ((extent - win).min(0.0) - pad, (extent - win).max(0.0) + pad);
        if hi > lo {
            rng.gen_range(lo..=hi).round()
        } else {
            lo
        }
    };
    let top = range(h as f32, wh, rng);
    let left = range(w as f32, ww, rng);
    let inside = |v: f32, n: usize| v >= 0.0 && v < n as f32;
    for oy in 0..h {
        let y = top + (oy as f32 + 0.5) * wh / h as f32;
        for ox in 0..w {
            let sx = if flip { w - 1 - ox } else { ox };
            let x = left + (sx as f32 + 0.5) * ww / w as f32;
            let ok = inside(y, h) && inside(x, w);
            dst_mask[oy * w + ox] = if ok {
                i64::from(mask[[y as usize, x as usize]])
            } else {
                i64::from(ignore)
            };
            for c in 0..c_n {
                dst[(c * h + oy) * w + ox] = if ok { bilinear(&img, c, y, x) } else { 0.0 };
            }
        }
    }
}

/// Normalise raw 0..255 CHW values in place.
pub fn normalize(dst: &mut [f32], norm: &Normalize, hw: usize) {
    for (c, chunk) in dst.chunks_mut(hw).enumerate() {
        let (m, s) = (norm.mean[c % norm.mean.len()], norm.std[c % norm.std.len()]);
        for v in chunk {
            *v = (*v / 255.0 - m) / s;
        }
    }
}
