//! Baseline weighting strategies of docs/METHOD.md section 8 for the comparison table: EBKD (entropy),
//! CA-MKD (confidence) and AEKD (minimum-norm point of the teachers' gradients).
//!
//! AVER, single-teacher KD and no distillation are in [`crate::weighting`]. Every strategy here
//! reads only the detached [`BatchSignals`], so no gradient flows through its weights. Checked
//! against PyTorch in `tests/baselines.rs` (values from `scripts/golden_baselines.py`).

use tch::{Device, Kind, Tensor};

use crate::error::{check_shape, Error, Result};
use crate::signals::BatchSignals;
use crate::weighting::{TeacherWeights, WeightingStrategy};

/// Entropy-based KD (EBKD): the more certain a teacher on a sample, the larger its weight.
///
/// `w[b, m] = 1 - H[b, m] / sum_j H[b, j]`, with `H` the entropy of `softmax(z_m)` at T = 1
/// ([`BatchSignals::entropy`]); the same weights for the logit and the feature losses.
///
/// As in docs/METHOD.md (and the EBKD paper), a sample's weights sum to `M - 1`, not to 1: with three
/// or more teachers the KD term is `M - 1` times the scale of AVER's. One teacher gets weight 1.
/// When every teacher of a sample has zero entropy (one-hot softmax), each gets `1 - 1/M`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ebkd;

impl WeightingStrategy for Ebkd {
    fn retain_teachers(&mut self, _keep: &[usize]) -> Result<()> {
        Ok(())
    }
    fn name(&self) -> &str {
        "ebkd"
    }

    fn weights(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        let w = tch::no_grad(|| entropy_weights(&signals.entropy))?;
        Ok(TeacherWeights {
            pixel: None,
            feature: w.copy(),
            logit: w,
        })
    }
}

/// EBKD weights `1 - H / sum_m H` per sample (1 for a single teacher); rows sum to `M - 1`.
///
/// # Shapes
/// `entropy [B, M]` -> `[B, M]` (float32, on the input's device)
pub fn entropy_weights(entropy: &Tensor) -> Result<Tensor> {
    check_shape("ebkd input (entropy matrix)", entropy, &[-1, -1])?;
    let m = entropy.size()[1];
    let h = entropy.f_to_kind(Kind::Float)?;
    if m == 1 {
        return Ok(h.f_ones_like()?);
    }
    // Entropies are >= 0; rounding can leave -1e-8. The tiny offset only matters when a whole
    // row is zero, where it makes every ratio 1/M instead of 0/0.
    const EPS: f64 = 1e-12;
    let h = h.f_clamp_min(0.0)?;
    let total = h.f_sum_dim_intlist(1i64, true, Kind::Float)?;
    let ratio = (h + EPS).f_div(&(total + EPS * m as f64))?;
    Ok(1.0 - ratio)
}

/// Confidence-aware MKD (CA-MKD): teachers with a lower cross-entropy on the sample's label get
/// more weight, `c = (1 - softmax_m(CE)) / (M - 1)` (see [`confidence_weights`]); rows sum to 1.
///
/// **Limitation.** In CA-MKD the *feature* weight is a second confidence,
/// `v_m = (1 - softmax_m(CE(head_m(S_m), y))) / (M - 1)`, where `head_m` is teacher m's own
/// classifier applied to the projected student map `S_m`. mtkd's [`crate::Teacher`] contract
/// gives logits and a feature map but not the classifier head, so `v` cannot be computed here:
/// this implementation uses the logit weight `c` for the features too. The CA-MKD rows of the
/// comparison table therefore differ from the paper's method in the feature term. (The paper's
/// feature-loss factor of 50 is the engine's `beta`, not part of this strategy.)
#[derive(Debug, Default, Clone, Copy)]
pub struct CaMkd;

impl WeightingStrategy for CaMkd {
    fn retain_teachers(&mut self, _keep: &[usize]) -> Result<()> {
        Ok(())
    }
    fn name(&self) -> &str {
        "ca-mkd"
    }

    fn weights(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        let c = tch::no_grad(|| confidence_weights(&signals.ce))?;
        Ok(TeacherWeights {
            pixel: None,
            feature: c.copy(),
            logit: c,
        })
    }
}

/// Teacher confidence `c = (1 - softmax_m(CE)) / (M - 1)` (docs/METHOD.md section 3): low
/// cross-entropy, high weight; rows sum to 1. For one teacher the formula divides by zero and
/// this returns 1 (docs/METHOD.md section 7, defect 1).
///
/// # Shapes
/// `ce [B, M]` -> `[B, M]` (float32, on the input's device)
pub fn confidence_weights(ce: &Tensor) -> Result<Tensor> {
    check_shape("confidence input (CE matrix)", ce, &[-1, -1])?;
    let m = ce.size()[1];
    if m == 1 {
        return Ok(ce.f_to_kind(Kind::Float)?.f_ones_like()?);
    }
    Ok((1.0 - ce.f_softmax(1, Kind::Float)?) / (m - 1) as f64)
}

/// Adaptive ensemble KD (AEKD): per batch, the teachers' KD gradients with respect to the
/// student's logits, `g_m = T (q - p_m)` averaged over the batch (`q = softmax(z_s / T)`,
/// `p_m = softmax(z_m / T)`, the closed form of the gradient of `T^2 KL(p_m || q)`), and the
/// weights `lambda` that give the minimum-norm point of their convex hull with every
/// `lambda_m <= cap`: `argmin lambda' G lambda` over `{0 <= lambda <= cap, sum lambda = 1}`,
/// `G` the Gram matrix of the `g_m` (see [`min_norm_capped_simplex`]).
///
/// The same `lambda` for every sample of the batch, for the logit and the feature losses.
/// A cap below `1 / M` leaves no feasible weights: [`WeightingStrategy::weights`] then fails
/// with [`Error::Invalid`] naming "aekd cap".
#[derive(Debug, Clone, Copy)]
pub struct Aekd {
    /// Upper bound `C` on each teacher's weight (0.6 in the AEKD paper).
    pub cap: f64,
}

impl Aekd {
    /// The AEKD paper's cap.
    pub const DEFAULT_CAP: f64 = 0.6;

    /// AEKD with the given cap on each teacher's weight (checked against M at every batch).
    pub fn new(cap: f64) -> Aekd {
        Aekd { cap }
    }
}

impl Default for Aekd {
    fn default() -> Aekd {
        Aekd::new(Aekd::DEFAULT_CAP)
    }
}

impl WeightingStrategy for Aekd {
    fn retain_teachers(&mut self, _keep: &[usize]) -> Result<()> {
        Ok(())
    }
    fn name(&self) -> &str {
        "aekd"
    }

    fn weights(&mut self, signals: &BatchSignals) -> Result<TeacherWeights> {
        if signals.num_teachers() == 1 {
            // One teacher: the capped simplex is just {1} whatever the cap.
            return Ok(TeacherWeights::broadcast(
                &[1.0],
                signals.batch_size(),
                signals.ce.device(),
            ));
        }
        check_cap(self.cap, signals.num_teachers() as usize)?;
        let g = aekd_gradients(
            &signals.student_logits,
            &signals.teacher_logits,
            signals.temperature,
        )?;
        let lambda = min_norm_capped_simplex(&g, self.cap)?;
        Ok(TeacherWeights::broadcast(
            &lambda,
            signals.batch_size(),
            signals.ce.device(),
        ))
    }
}

/// The batch-mean KD gradients `g_m = mean_b T (q_b - p_m,b)`, computed on the CPU in float64.
///
/// # Shapes
/// `student_logits [B, K]`, `teacher_logits[m] [B, K]` -> M vectors of K numbers
pub fn aekd_gradients(
    student_logits: &Tensor,
    teacher_logits: &[Tensor],
    temperature: f64,
) -> Result<Vec<Vec<f64>>> {
    if temperature <= 0.0 || !temperature.is_finite() {
        return Err(Error::Invalid {
            what: "aekd temperature".into(),
            reason: format!("must be positive, got {temperature}"),
        });
    }
    check_shape("aekd student logits", student_logits, &[-1, -1])?;
    let size = student_logits.size();
    tch::no_grad(|| {
        let s = student_logits
            .detach()
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Double)?;
        let q = (s / temperature).f_softmax(-1, Kind::Double)?;
        teacher_logits
            .iter()
            .enumerate()
            .map(|(m, z)| -> Result<Vec<f64>> {
                check_shape(&format!("aekd logits of teacher {m}"), z, &size)?;
                let z = z
                    .detach()
                    .f_to_device(Device::Cpu)?
                    .f_to_kind(Kind::Double)?;
                let p = (z / temperature).f_softmax(-1, Kind::Double)?;
                let g = ((&q - p) * temperature).f_mean_dim(0i64, false, Kind::Double)?;
                Ok(Vec::<f64>::try_from(&g)?)
            })
            .collect::<Result<Vec<Vec<f64>>>>()
    })
}

/// Minimum-norm point of the convex hull of the vectors `g[m]` with capped weights:
/// `argmin |sum_m lambda_m g[m]|^2` over `{0 <= lambda_m <= cap, sum_m lambda_m = 1}`.
///
/// `g` holds M vectors of one length K; the result has M entries. Fails with
/// [`Error::Invalid`] naming "aekd cap" when `cap * M < 1` (no feasible point) or `cap <= 0`.
/// See [`min_quadratic_capped_simplex`] for the solver.
pub fn min_norm_capped_simplex(g: &[Vec<f64>], cap: f64) -> Result<Vec<f64>> {
    let k = g.first().map_or(0, Vec::len);
    if let Some((m, v)) = g.iter().enumerate().find(|(_, v)| v.len() != k) {
        return Err(Error::ShapeMismatch {
            what: format!("aekd gradient of teacher {m}"),
            expected: format!("[{k}]"),
            got: format!("[{}]", v.len()),
        });
    }
    let gram: Vec<Vec<f64>> = g
        .iter()
        .map(|a| g.iter().map(|b| dot(a, b)).collect())
        .collect();
    min_quadratic_capped_simplex(&gram, cap)
}

/// `argmin x' G x` over the capped simplex `{0 <= x <= cap, sum x = 1}`, for a symmetric positive
/// semi-definite `G` (`gram`, M rows of M).
///
/// Deterministic: accelerated projected gradient (FISTA with gradient restart, step `1 / L`,
/// `L` = Frobenius norm of `G` >= its largest eigenvalue) from the uniform point, with exact
/// Euclidean projection onto the capped simplex (bisection on the shift), until the iterate moves
/// less than 1e-13; then the active set it found is polished by solving the KKT linear system
/// on the free coordinates, kept when feasible and no worse. `G = 0` (all gradients equal and
/// zero, e.g. identical teachers and student) and `cap * M = 1` give the uniform point.
pub fn min_quadratic_capped_simplex(gram: &[Vec<f64>], cap: f64) -> Result<Vec<f64>> {
    let m = gram.len();
    check_cap(cap, m)?;
    if let Some((i, row)) = gram.iter().enumerate().find(|(_, r)| r.len() != m) {
        return Err(Error::ShapeMismatch {
            what: format!("aekd Gram matrix row {i}"),
            expected: format!("[{m}]"),
            got: format!("[{}]", row.len()),
        });
    }
    if gram.iter().flatten().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "aekd Gram matrix".into(),
        });
    }
    let uniform = vec![1.0 / m as f64; m];
    if cap * (m as f64) <= 1.0 + CAP_TOL {
        return Ok(uniform);
    }
    let cap = cap.min(1.0);
    let norm = gram.iter().flatten().map(|v| v * v).sum::<f64>().sqrt();
    if norm < f64::MIN_POSITIVE {
        return Ok(uniform);
    }
    // Scale to a unit Frobenius norm: the minimiser is unchanged and the step is 1.
    let h: Vec<Vec<f64>> = gram
        .iter()
        .map(|r| r.iter().map(|v| v / norm).collect())
        .collect();

    let mut x = uniform.clone();
    let mut y = uniform;
    let mut t = 1.0f64;
    for _ in 0..MAX_ITERS {
        let hy = mat_vec(&h, &y);
        let step: Vec<f64> = y.iter().zip(&hy).map(|(a, b)| a - b).collect();
        let x_new = project_capped_simplex(&step, cap);
        let change = x_new
            .iter()
            .zip(&x)
            .fold(0.0f64, |acc, (a, b)| acc.max((a - b).abs()));
        // Gradient restart (O'Donoghue & Candes): drop the momentum when it points uphill.
        let uphill: f64 = y
            .iter()
            .zip(&x_new)
            .zip(&x)
            .map(|((yi, ni), xi)| (yi - ni) * (ni - xi))
            .sum();
        if uphill > 0.0 {
            t = 1.0;
            y = x_new.clone();
        } else {
            let t_new = 0.5 * (1.0 + (1.0 + 4.0 * t * t).sqrt());
            let beta = (t - 1.0) / t_new;
            y = x_new
                .iter()
                .zip(&x)
                .map(|(ni, xi)| ni + beta * (ni - xi))
                .collect();
            t = t_new;
        }
        x = x_new;
        if change < STOP_TOL {
            break;
        }
    }
    if let Some(z) = polish(&h, &x, cap).filter(|z| quad(&h, z) <= quad(&h, &x) + 1e-13) {
        x = z;
    }
    if x.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "aekd weights".into(),
        });
    }
    Ok(x)
}

const MAX_ITERS: usize = 20_000;
const STOP_TOL: f64 = 1e-13;
const CAP_TOL: f64 = 1e-12;
/// Distance to a bound under which the polish treats a coordinate as on that bound.
const BOUND_TOL: f64 = 1e-9;

fn check_cap(cap: f64, m: usize) -> Result<()> {
    if m == 0 {
        return Err(Error::Invalid {
            what: "aekd teachers".into(),
            reason: "AEKD needs at least one teacher".into(),
        });
    }
    if cap.is_nan() || cap <= 0.0 {
        return Err(Error::Invalid {
            what: "aekd cap".into(),
            reason: format!("must be positive, got {cap}"),
        });
    }
    if cap * (m as f64) < 1.0 - CAP_TOL {
        return Err(Error::Invalid {
            what: "aekd cap".into(),
            reason: format!(
                "{cap} with {m} teachers is infeasible: the weights sum to 1, so the cap must be \
                 at least 1/{m}"
            ),
        });
    }
    Ok(())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn mat_vec(h: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    h.iter().map(|row| dot(row, x)).collect()
}

fn quad(h: &[Vec<f64>], x: &[f64]) -> f64 {
    dot(x, &mat_vec(h, x))
}

/// Euclidean projection of `y` onto `{0 <= x <= cap, sum x = 1}` (needs `cap * len > 1`):
/// `x = clamp(y - tau, 0, cap)` with the shift `tau` found by bisection to machine precision.
fn project_capped_simplex(y: &[f64], cap: f64) -> Vec<f64> {
    let clipped_sum = |tau: f64| -> f64 { y.iter().map(|v| (v - tau).clamp(0.0, cap)).sum() };
    // At `lo` every coordinate sits at the cap (sum M cap > 1), at `hi` at zero (sum 0).
    let mut lo = y.iter().copied().fold(f64::INFINITY, f64::min) - cap;
    let mut hi = y.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if clipped_sum(mid) > 1.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let tau = 0.5 * (lo + hi);
    y.iter().map(|v| (v - tau).clamp(0.0, cap)).collect()
}

/// The exact minimiser on the face that `x` lies on: coordinates within [`BOUND_TOL`] of 0 or of
/// `cap` are fixed there, the others solve `H_FF x_F - nu 1 = -H_FU cap 1, sum x_F = rest`.
/// `None` when that system is singular or its solution leaves the box.
fn polish(h: &[Vec<f64>], x: &[f64], cap: f64) -> Option<Vec<f64>> {
    let at_cap: Vec<bool> = x.iter().map(|&v| v >= cap - BOUND_TOL).collect();
    let at_zero: Vec<bool> = x.iter().map(|&v| v <= BOUND_TOL).collect();
    let free: Vec<usize> = (0..x.len())
        .filter(|&i| !at_cap[i] && !at_zero[i])
        .collect();
    let capped: Vec<usize> = (0..x.len()).filter(|&i| at_cap[i]).collect();
    let mut z: Vec<f64> = at_cap.iter().map(|&c| if c { cap } else { 0.0 }).collect();
    let rest = 1.0 - cap * capped.len() as f64;
    if free.is_empty() {
        return (rest.abs() <= CAP_TOL).then_some(z);
    }
    let n = free.len();
    let mut a = vec![vec![0.0; n + 1]; n + 1];
    let mut b = vec![0.0; n + 1];
    for (r, &i) in free.iter().enumerate() {
        for (c, &j) in free.iter().enumerate() {
            a[r][c] = h[i][j];
        }
        a[r][n] = -1.0;
        a[n][r] = 1.0;
        b[r] = -cap * capped.iter().map(|&j| h[i][j]).sum::<f64>();
    }
    b[n] = rest;
    let sol = solve_linear(a, b)?;
    for (r, &i) in free.iter().enumerate() {
        let v = sol[r];
        if !(-CAP_TOL..=cap + CAP_TOL).contains(&v) {
            return None;
        }
        z[i] = v.clamp(0.0, cap);
    }
    Some(z)
}

/// Gaussian elimination with partial pivoting; `None` when the matrix is (numerically) singular.
fn solve_linear(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    let scale = a.iter().flatten().fold(0.0f64, |s, v| s.max(v.abs()));
    if scale <= 0.0 || scale.is_nan() {
        return None;
    }
    for col in 0..n {
        let piv = (col..n).max_by(|&r, &s| a[r][col].abs().total_cmp(&a[s][col].abs()))?;
        if a[piv][col].abs() <= 1e-12 * scale {
            return None;
        }
        a.swap(col, piv);
        b.swap(col, piv);
        let pivot_row = a[col].clone();
        let pivot_b = b[col];
        for r in col + 1..n {
            let f = a[r][col] / pivot_row[col];
            if f != 0.0 {
                for (v, p) in a[r].iter_mut().zip(&pivot_row).skip(col) {
                    *v -= f * p;
                }
                b[r] -= f * pivot_b;
            }
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|c| a[r][c] * x[c]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_lands_on_the_capped_simplex() {
        let x = project_capped_simplex(&[2.0, 0.1, -1.0], 0.6);
        assert!((x.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{x:?}");
        assert!((x[0] - 0.6).abs() < 1e-12 && x[2].abs() < 1e-15, "{x:?}");
    }

    #[test]
    fn two_collinear_gradients_hit_the_cap() {
        // |l1 g + l2 2g| is smallest at l1 = 1; the cap stops it at 0.6.
        let g = [vec![1.0, 0.0], vec![2.0, 0.0]];
        let x = min_norm_capped_simplex(&g, 0.6).unwrap();
        assert!(
            (x[0] - 0.6).abs() < 1e-12 && (x[1] - 0.4).abs() < 1e-12,
            "{x:?}"
        );
        let x = min_norm_capped_simplex(&g, 1.0).unwrap();
        assert!((x[0] - 1.0).abs() < 1e-12 && x[1].abs() < 1e-12, "{x:?}");
    }

    #[test]
    fn orthogonal_gradients_share_and_zero_gradients_are_uniform() {
        let g = [vec![1.0, 0.0], vec![0.0, 1.0]];
        let x = min_norm_capped_simplex(&g, 0.6).unwrap();
        assert!(
            (x[0] - 0.5).abs() < 1e-12 && (x[1] - 0.5).abs() < 1e-12,
            "{x:?}"
        );
        let zeros: Vec<Vec<f64>> = (0..3).map(|_| vec![0.0; 4]).collect();
        let x = min_norm_capped_simplex(&zeros, 0.6).unwrap();
        assert!(x.iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-15), "{x:?}");
        // Opposite gradients: the hull contains the origin, at 1/3 and 2/3.
        let g = [vec![2.0, 0.0], vec![-1.0, 0.0]];
        let x = min_norm_capped_simplex(&g, 0.7).unwrap();
        assert!((x[0] - 1.0 / 3.0).abs() < 1e-12, "{x:?}");
    }

    #[test]
    fn infeasible_cap_is_an_error() {
        let err = min_norm_capped_simplex(&[vec![1.0], vec![2.0], vec![3.0]], 0.3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("aekd cap"), "{err}");
        assert!(min_norm_capped_simplex(&[vec![1.0]], 0.0).is_err());
        let x = min_norm_capped_simplex(&[vec![1.0], vec![2.0], vec![3.0]], 1.0 / 3.0).unwrap();
        assert!(x.iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-15), "{x:?}");
    }
}
