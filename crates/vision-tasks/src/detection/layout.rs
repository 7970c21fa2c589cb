//! The location layout of mtkd's detectors and the FCOS target assignment (docs/METHOD.md,
//! section 14).
//!
//! A detector's output is one tensor `[B, K + 5, L]` over `L` locations: the pyramid's levels
//! (strides `4, 8, 16`), each flattened row-major, one after the other. Location `(x, y)` of the
//! level with stride `s` has its centre at `((x + 0.5) s, (y + 0.5) s)`. Channels `0..K` are
//! per-class logits (sigmoid), `K..K+4` the distances `(l, t, r, b)` from the centre to the
//! box's sides divided by `s` (non-negative), `K + 4` the centerness logit.
//!
//! Assignment (FCOS, Tian et al. 2019, with torchvision's centre sampling): a location is
//! positive for a ground-truth box when its centre lies inside the box and within
//! `CENTER_RADIUS` strides of the box's centre, and the largest of its four distances to the
//! box's sides falls in its level's range (`(SIZE_FACTOR s / 2, SIZE_FACTOR s]`, the first level
//! from 0, the last without bound). Among several such boxes it takes the smallest.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// The pyramid's strides: the zoo's backbones give a stride-4 map, and two stride-2 levels
/// are built on it.
pub const STRIDES: [i64; 3] = [4, 8, 16];
/// Centre sampling radius, in strides (torchvision's FCOS: 1.5).
pub const CENTER_RADIUS: f64 = 1.5;
/// A level of stride `s` takes boxes whose largest centre-to-side distance is at most
/// `SIZE_FACTOR * s` (FCOS uses 8 on COCO's large images; mtkd's are 48 to 64 pixels).
pub const SIZE_FACTOR: f64 = 4.0;

/// The locations of a detector for one input size.
#[derive(Debug, Clone, PartialEq)]
pub struct DetLayout {
    /// Input `(H, W)`.
    pub image: (i64, i64),
    pub strides: Vec<i64>,
    /// `(h, w)` of every level: `(ceil(H / s), ceil(W / s))`.
    pub sizes: Vec<(i64, i64)>,
}

/// Assigned targets of a batch.
#[derive(Debug)]
pub struct Targets {
    /// Class of every location, `-1` for background `[B, L]` (int64).
    pub classes: Tensor,
    /// The assigned box `[B, L, 4]` (zeros at background).
    pub boxes: Tensor,
    /// Centerness target `[B, L]` (0 at background).
    pub centerness: Tensor,
}

impl Targets {
    /// Positive locations `[B, L]` (float 0/1).
    pub fn positive(&self) -> Tensor {
        self.classes.ge(0).to_kind(Kind::Float)
    }
    /// Packed as one float tensor `[B, L, 6]`: class, box, centerness.
    pub fn pack(&self) -> Tensor {
        Tensor::cat(
            &[
                self.classes.to_kind(Kind::Float).unsqueeze(-1),
                self.boxes.shallow_clone(),
                self.centerness.unsqueeze(-1),
            ],
            -1,
        )
    }
    /// Inverse of [`Targets::pack`].
    pub fn unpack(t: &Tensor) -> Result<Targets> {
        let s = t.size();
        if s.len() != 3 || s[2] != 6 {
            return Err(Error::Invalid {
                what: "detection targets".into(),
                reason: format!("expected packed targets [B, L, 6], got {s:?}"),
            });
        }
        Ok(Targets {
            classes: t.select(2, 0).round().to_kind(Kind::Int64),
            boxes: t.slice(2, 1, 5, 1),
            centerness: t.select(2, 5),
        })
    }
}

impl DetLayout {
    /// The layout of an `(H, W)` input at `strides`.
    pub fn new(image: (i64, i64), strides: &[i64]) -> DetLayout {
        let up = |a: i64, s: i64| (a + s - 1) / s;
        DetLayout {
            image,
            strides: strides.to_vec(),
            sizes: strides
                .iter()
                .map(|&s| (up(image.0, s), up(image.1, s)))
                .collect(),
        }
    }

    /// The standard layout (strides [`STRIDES`]).
    pub fn standard(image: (i64, i64)) -> DetLayout {
        DetLayout::new(image, &STRIDES)
    }

    /// Number of locations L.
    pub fn len(&self) -> i64 {
        self.sizes.iter().map(|(h, w)| h * w).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Per location: centre x, centre y, stride, range low, range high `[L, 5]`.
    pub fn locations(&self, device: Device) -> Tensor {
        let mut v: Vec<f32> = Vec::with_capacity(self.len() as usize * 5);
        let n = self.strides.len();
        for (l, (&s, &(h, w))) in self.strides.iter().zip(&self.sizes).enumerate() {
            let sf = s as f64;
            let lo = if l == 0 { -1.0 } else { SIZE_FACTOR * sf / 2.0 };
            let hi = if l + 1 == n { 1e8 } else { SIZE_FACTOR * sf };
            for y in 0..h {
                for x in 0..w {
                    v.extend_from_slice(&[
                        ((x as f64 + 0.5) * sf) as f32,
                        ((y as f64 + 0.5) * sf) as f32,
                        s as f32,
                        lo as f32,
                        hi as f32,
                    ]);
                }
            }
        }
        Tensor::from_slice(&v)
            .view([self.len(), 5])
            .to_device(device)
    }

    /// Level index of every location `[L]` (int64).
    pub fn levels(&self, device: Device) -> Tensor {
        let v: Vec<i64> = self
            .sizes
            .iter()
            .enumerate()
            .flat_map(|(l, (h, w))| std::iter::repeat_n(l as i64, (h * w) as usize))
            .collect();
        Tensor::from_slice(&v).to_device(device)
    }

    /// Check a detector output `[B, K + 5, L]`.
    pub fn check(&self, what: &str, out: &Tensor, num_classes: i64) -> Result<()> {
        let s = out.size();
        if s.len() != 3 || s[1] != num_classes + 5 || s[2] != self.len() {
            return Err(Error::Invalid {
                what: what.into(),
                reason: format!(
                    "a detector's output must be [B, K + 5, L] = [B, {}, {}] (K = {num_classes} \
                     classes, L = {} locations at strides {:?} of a {}x{} input), got {s:?}",
                    num_classes + 5,
                    self.len(),
                    self.len(),
                    self.strides,
                    self.image.0,
                    self.image.1
                ),
            });
        }
        Ok(())
    }

    /// FCOS assignment of a batch's ground truth `gt [B, N, 5]` (`x1, y1, x2, y2, class`, class
    /// `-1` for padding).
    pub fn assign(&self, gt: &Tensor) -> Result<Targets> {
        let s = gt.size();
        if s.len() != 3 || s[2] != 5 {
            return Err(Error::Invalid {
                what: "detection ground truth".into(),
                reason: format!("expected boxes [B, N, 5] (x1, y1, x2, y2, class), got {s:?}"),
            });
        }
        let (b, n) = (s[0], s[1]);
        let device = gt.device();
        let l_n = self.len();
        if n == 0 {
            return Ok(Targets {
                classes: Tensor::full([b, l_n], -1, (Kind::Int64, device)),
                boxes: Tensor::zeros([b, l_n, 4], (Kind::Float, device)),
                centerness: Tensor::zeros([b, l_n], (Kind::Float, device)),
            });
        }
        let gt = gt.f_to_kind(Kind::Float)?;
        let loc = self.locations(device);
        let (cx, cy, st, lo, hi) = (
            loc.select(1, 0).view([1, l_n, 1]),
            loc.select(1, 1).view([1, l_n, 1]),
            loc.select(1, 2).view([1, l_n, 1]),
            loc.select(1, 3).view([1, l_n, 1]),
            loc.select(1, 4).view([1, l_n, 1]),
        );
        let g = |i: i64| gt.select(2, i).unsqueeze(1); // [B, 1, N]
        let (x1, y1, x2, y2, cls) = (g(0), g(1), g(2), g(3), g(4));
        let left = &cx - &x1;
        let top = &cy - &y1;
        let right = &x2 - &cx;
        let bottom = &y2 - &cy;
        let ltrb = Tensor::stack(&[&left, &top, &right, &bottom], -1); // [B, L, N, 4]
        let inside = ltrb.amin(-1, false).gt(0.0);
        let (bcx, bcy) = ((&x1 + &x2) / 2.0, (&y1 + &y2) / 2.0);
        let radius = &st * CENTER_RADIUS;
        let near = (&cx - &bcx)
            .abs()
            .lt_tensor(&radius)
            .logical_and(&(&cy - &bcy).abs().lt_tensor(&radius));
        let reach = ltrb.amax(-1, false);
        let in_range = reach.gt_tensor(&lo).logical_and(&reach.le_tensor(&hi));
        let valid = cls.ge(0.0);
        let ok = inside
            .logical_and(&near)
            .logical_and(&in_range)
            .logical_and(&valid);
        let area = (&x2 - &x1) * (&y2 - &y1); // [B, 1, N]
        let inf = Tensor::full([1], f64::INFINITY, (Kind::Float, device));
        let cost = area.expand([b, l_n, n], false).where_self(&ok, &inf);
        let (best, idx) = cost.min_dim(-1, false); // [B, L]
        let pos = best.isfinite();
        let pick = |t: &Tensor| -> Tensor {
            t.expand([b, l_n, n], false)
                .gather(2, &idx.unsqueeze(-1), false)
                .squeeze_dim(-1)
        };
        let classes = pick(&cls)
            .round()
            .to_kind(Kind::Int64)
            .where_self(&pos, &Tensor::full([1], -1, (Kind::Int64, device)));
        let posf = pos.to_kind(Kind::Float);
        let boxes =
            Tensor::stack(&[pick(&x1), pick(&y1), pick(&x2), pick(&y2)], -1) * posf.unsqueeze(-1);
        let d = ltrb.gather(
            2,
            &idx.view([b, l_n, 1, 1]).expand([b, l_n, 1, 4], false),
            false,
        );
        let d = d.squeeze_dim(2).clamp_min(0.0); // [B, L, 4]
        let (dl, dt, dr, db) = (
            d.select(2, 0),
            d.select(2, 1),
            d.select(2, 2),
            d.select(2, 3),
        );
        let ratio = |a: &Tensor, c: &Tensor| a.minimum(c) / a.maximum(c).clamp_min(1e-6);
        let centerness = (ratio(&dl, &dr) * ratio(&dt, &db)).sqrt() * &posf;
        Ok(Targets {
            classes,
            boxes,
            centerness,
        })
    }

    /// Decode a detector output `[B, K + 5, L]` into boxes `[B, L, 4]` (pixels, clipped to the
    /// image), class probabilities `[B, L, K]` and centerness probabilities `[B, L]`.
    pub fn decode(&self, out: &Tensor, num_classes: i64) -> Result<(Tensor, Tensor, Tensor)> {
        self.check("detector output", out, num_classes)?;
        let k = num_classes;
        let loc = self.locations(out.device());
        let (cx, cy, st) = (loc.select(1, 0), loc.select(1, 1), loc.select(1, 2));
        let boxes = self.boxes_of(out, k, &cx, &cy, &st)?;
        let (h, w) = self.image;
        let x = |t: Tensor| t.clamp(0.0, w as f64);
        let y = |t: Tensor| t.clamp(0.0, h as f64);
        let boxes = Tensor::stack(
            &[
                x(boxes.select(2, 0)),
                y(boxes.select(2, 1)),
                x(boxes.select(2, 2)),
                y(boxes.select(2, 3)),
            ],
            -1,
        );
        let probs = out.slice(1, 0, k, 1).transpose(1, 2).sigmoid();
        let ctr = out.select(1, k + 4).sigmoid();
        Ok((boxes, probs, ctr))
    }

    /// Unclipped boxes `[B, L, 4]` of an output (differentiable).
    pub fn boxes(&self, out: &Tensor, num_classes: i64) -> Result<Tensor> {
        let loc = self.locations(out.device());
        self.boxes_of(
            out,
            num_classes,
            &loc.select(1, 0),
            &loc.select(1, 1),
            &loc.select(1, 2),
        )
    }

    fn boxes_of(
        &self,
        out: &Tensor,
        k: i64,
        cx: &Tensor,
        cy: &Tensor,
        st: &Tensor,
    ) -> Result<Tensor> {
        let d = out.f_slice(1, k, k + 4, 1)?.f_clamp_min(0.0)? * st.view([1, 1, -1]);
        Ok(Tensor::stack(
            &[
                cx - d.select(1, 0),
                cy - d.select(1, 1),
                cx + d.select(1, 2),
                cy + d.select(1, 3),
            ],
            -1,
        ))
    }
}
