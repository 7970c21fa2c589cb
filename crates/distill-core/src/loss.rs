//! Per-sample losses of docs/METHOD.md sections 2 and 4. Each returns a `[B]` tensor; the caller weights
//! and averages. Checked against PyTorch in `tests/golden.rs`.

use tch::{Kind, Reduction, Tensor};

use crate::error::{check_shape, Error, Result};

/// Cross-entropy of `logits` against integer `targets`, per sample.
///
/// # Shapes
/// `logits [B, K]`, `targets [B]` (int64) -> `[B]`
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_shape("cross_entropy logits", logits, &[-1, -1])?;
    check_shape("cross_entropy targets", targets, &[logits.size()[0]])?;
    Ok(logits.f_cross_entropy_loss::<&Tensor>(targets, None, Reduction::None, -100, 0.0)?)
}

/// Temperature-scaled KL divergence `T^2 * KL(softmax(t/T) || softmax(s/T))`, per sample.
/// Gradients flow through `student` only if it requires them; `teacher` is treated as constant.
///
/// # Shapes
/// `student [B, K]`, `teacher [B, K]` -> `[B]`
pub fn kd_kl(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    if temperature <= 0.0 || !temperature.is_finite() {
        return Err(Error::Invalid {
            what: "temperature".into(),
            reason: format!("must be positive, got {temperature}"),
        });
    }
    check_shape("kd_kl teacher logits", teacher, &student.size())?;
    let log_q = (student / temperature).f_log_softmax(-1, Kind::Float)?;
    let log_p = (teacher.detach() / temperature).f_log_softmax(-1, Kind::Float)?;
    let kl = (log_p.exp() * (&log_p - log_q)).f_sum_dim_intlist(-1, false, Kind::Float)?;
    Ok(kl * (temperature * temperature))
}

/// Mean squared error between two feature maps, averaged over all but the batch dimension.
///
/// # Shapes
/// `student [B, C, H, W]`, `teacher [B, C, H, W]` -> `[B]`
pub fn feature_mse(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    check_shape("feature_mse teacher map", teacher, &student.size())?;
    let diff = student - teacher.detach();
    let per = diff.square().flatten(1, -1);
    Ok(per.f_mean_dim(-1, false, Kind::Float)?)
}

/// Pearson-style feature distillation (PKD, Cao et al. 2022): each map is normalised per
/// sample and channel over its locations to zero mean and unit variance (eps 1e-6, biased
/// variance), then compared by mean squared error, so that teachers whose features differ in
/// scale (another detector type) are compared by their correlation pattern. Equals
/// `2 (1 - r)` averaged over channels, `r` the Pearson correlation of the two channels.
///
/// # Shapes
/// `student [B, C, H, W]`, `teacher [B, C, H, W]` -> `[B]`
pub fn feature_pearson(student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    check_shape("feature_pearson teacher map", teacher, &student.size())?;
    let norm = |x: &Tensor| -> Result<Tensor> {
        let f = x.f_flatten(2, -1)?;
        let mean = f.f_mean_dim(-1, true, Kind::Float)?;
        let var = f.f_var_correction([-1i64].as_slice(), 0.0, true)?;
        Ok((f - mean) / (var + 1e-6).sqrt())
    };
    let diff = norm(student)? - norm(&teacher.detach())?;
    Ok(diff
        .square()
        .flatten(1, -1)
        .f_mean_dim(-1, false, Kind::Float)?)
}

/// Cosine similarity along dim 1 (eps 1e-8, as `torch.nn.functional.cosine_similarity`).
///
/// # Shapes
/// `a [B, C]`, `b [B, C]` -> `[B]`
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_shape("cosine second operand", b, &a.size())?;
    Ok(Tensor::f_cosine_similarity(a, b, 1, 1e-8)?)
}

/// Entropy of `softmax(logits)` (natural log), per sample.
///
/// # Shapes
/// `logits [B, K]` -> `[B]`
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    let log_p = logits.f_log_softmax(-1, Kind::Float)?;
    Ok(-(log_p.exp() * log_p).f_sum_dim_intlist(-1, false, Kind::Float)?)
}

/// Top-k correct flags per sample (1.0 if the target is among the `k` largest logits).
///
/// # Shapes
/// `logits [B, K]`, `targets [B]` -> `[B]` (float)
pub fn topk_correct(logits: &Tensor, targets: &Tensor, k: i64) -> Result<Tensor> {
    let k = k.min(logits.size()[1]);
    let (_, idx) = logits.f_topk(k, -1, true, true)?;
    Ok(idx
        .f_eq_tensor(&targets.unsqueeze(-1))?
        .f_any_dim(-1, false)?
        .to_kind(Kind::Float))
}

/// Fail with [`Error::NonFinite`] naming `what` when `t` holds NaN or infinity.
pub fn ensure_finite(what: &str, t: &Tensor) -> Result<()> {
    let finite = t.f_isfinite()?.f_all()?.int64_value(&[]) != 0;
    if finite {
        Ok(())
    } else {
        Err(Error::NonFinite {
            what: what.to_owned(),
        })
    }
}

/// Mean over each image's valid pixels of a per-pixel map `[B, H, W]`: pixels whose `valid`
/// flag is 0 do not count; an image without a valid pixel gets 0.
///
/// # Shapes
/// `per_pixel [B, H, W]`, `valid [B, H, W]` (float 0/1) -> `[B]`
pub fn masked_image_mean(per_pixel: &Tensor, valid: &Tensor) -> Result<Tensor> {
    check_shape("masked_image_mean valid mask", valid, &per_pixel.size())?;
    let num = (per_pixel * valid)
        .f_flatten(1, -1)?
        .f_sum_dim_intlist(-1, false, Kind::Float)?;
    let den = valid
        .f_flatten(1, -1)?
        .f_sum_dim_intlist(-1, false, Kind::Float)?
        .f_clamp_min(1.0)?;
    Ok(num / den)
}

/// The valid-pixel flags `[B, H, W]` (float 0/1) of a mask: every pixel but `ignore_index`.
pub fn valid_pixels(targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
    Ok(targets.f_ne(ignore_index)?.f_to_kind(Kind::Float)?)
}

/// Per-pixel cross-entropy averaged over each image's valid pixels (pixels labelled
/// `ignore_index` do not count), as `F.cross_entropy(..., ignore_index, reduction="none")`
/// followed by a per-image mean over the valid pixels.
///
/// # Shapes
/// `logits [B, K, H, W]`, `targets [B, H, W]` (int64) -> `[B]`
pub fn pixel_cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: i64) -> Result<Tensor> {
    let s = logits.size();
    check_shape("pixel_cross_entropy logits", logits, &[-1, -1, -1, -1])?;
    check_shape("pixel_cross_entropy targets", targets, &[s[0], s[2], s[3]])?;
    let per = logits.f_cross_entropy_loss::<&Tensor>(
        targets,
        None,
        Reduction::None,
        ignore_index,
        0.0,
    )?;
    masked_image_mean(&per, &valid_pixels(targets, ignore_index)?)
}

/// Pixel-wise KD: `T^2 KL(softmax(t/T) || softmax(s/T))` over the class dimension at every pixel,
/// per pixel `[B, H, W]` (the caller pools it, e.g. with [`masked_image_mean`]).
///
/// # Shapes
/// `student [B, K, H, W]`, `teacher [B, K, H, W]` -> `[B, H, W]`
pub fn pixel_kd_kl(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    if temperature <= 0.0 || !temperature.is_finite() {
        return Err(Error::Invalid {
            what: "temperature".into(),
            reason: format!("must be positive, got {temperature}"),
        });
    }
    check_shape("pixel_kd_kl student logits", student, &[-1, -1, -1, -1])?;
    check_shape("pixel_kd_kl teacher logits", teacher, &student.size())?;
    let log_q = (student / temperature).f_log_softmax(1, Kind::Float)?;
    let log_p = (teacher.detach() / temperature).f_log_softmax(1, Kind::Float)?;
    let kl = (log_p.exp() * (&log_p - log_q)).f_sum_dim_intlist(1, false, Kind::Float)?;
    Ok(kl * (temperature * temperature))
}

/// Channel-wise distillation (CWD, Shu et al. 2021): each channel's map is turned into a
/// distribution over its H·W locations by a softmax at temperature T, and the student's is
/// pulled to the teacher's by `T^2 KL`, averaged over channels, per image. Applies to logits
/// `[B, K, H, W]` and to feature maps alike.
///
/// # Shapes
/// `student [B, C, H, W]`, `teacher [B, C, H, W]` -> `[B]`
pub fn cwd(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    if temperature <= 0.0 || !temperature.is_finite() {
        return Err(Error::Invalid {
            what: "temperature".into(),
            reason: format!("must be positive, got {temperature}"),
        });
    }
    check_shape("cwd student map", student, &[-1, -1, -1, -1])?;
    check_shape("cwd teacher map", teacher, &student.size())?;
    let s = student.f_flatten(2, -1)?;
    let t = teacher.detach().f_flatten(2, -1)?;
    let log_q = (&s / temperature).f_log_softmax(-1, Kind::Float)?;
    let log_p = (&t / temperature).f_log_softmax(-1, Kind::Float)?;
    let kl = (log_p.exp() * (&log_p - log_q)).f_sum_dim_intlist(-1, false, Kind::Float)?;
    Ok(kl.f_mean_dim(-1, false, Kind::Float)? * (temperature * temperature))
}

/// Per-pixel entropy of `softmax(logits)` over the class dimension.
///
/// # Shapes
/// `logits [B, K, H, W]` -> `[B, H, W]`
pub fn pixel_entropy(logits: &Tensor) -> Result<Tensor> {
    let log_p = logits.f_log_softmax(1, Kind::Float)?;
    Ok(-(log_p.exp() * log_p).f_sum_dim_intlist(1, false, Kind::Float)?)
}

/// Logits pooled over each image's valid pixels: `[B, K, H, W]` -> `[B, K]` (the mean logit
/// vector). For a linear 1x1 classifier this equals the classifier applied to the pooled
/// features, which is what look-ahead strategies assume.
pub fn pooled_logits(logits: &Tensor, valid: &Tensor) -> Result<Tensor> {
    let v = valid.f_unsqueeze(1)?;
    let num = (logits * &v).f_sum_dim_intlist([2i64, 3].as_slice(), false, Kind::Float)?;
    let den = v
        .f_sum_dim_intlist([2i64, 3].as_slice(), false, Kind::Float)?
        .f_clamp_min(1.0)?;
    Ok(num / den)
}

/// The KD term `[B]` of a dense task with per-pixel teacher weights (docs/METHOD.md section 13):
/// at pixel p of image b, teacher m's weight is
/// `w[b, m] c[b, m, p] / sum_m' w[b, m'] c[b, m', p] * sum_m' w[b, m']`, where `c` is CA-MKD's
/// confidence computed per pixel from each teacher's pixel cross-entropy, `(1 - softmax_m(CE))
/// / (M - 1)` (1 for a single teacher): the strategy's per-image total is kept and moved, pixel
/// by pixel, to the teachers that are right there. The term is the sum over teachers of the
/// mean over labelled pixels of `weight x T^2 KL`. The weights carry no gradient.
///
/// # Shapes
/// `student [B, K, H, W]`, `teachers[m] [B, K, H, W]`, `w [B, M]`, `targets [B, H, W]` -> `[B]`
pub fn pixel_weighted_kd(
    student: &Tensor,
    teachers: &[Tensor],
    w: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    temperature: f64,
) -> Result<Tensor> {
    check_shape(
        "pixel_weighted_kd student logits",
        student,
        &[-1, -1, -1, -1],
    )?;
    let m = teachers.len() as i64;
    check_shape("pixel_weighted_kd weights", w, &[student.size()[0], m])?;
    let weights = tch::no_grad(|| -> Result<Tensor> {
        let ce: Vec<Tensor> = teachers
            .iter()
            .map(|t| {
                t.f_cross_entropy_loss::<&Tensor>(targets, None, Reduction::None, ignore_index, 0.0)
            })
            .collect::<std::result::Result<_, _>>()?;
        let ce = Tensor::f_stack(&ce, 1)?; // [B, M, H, W]
        let c = if m == 1 {
            ce.f_ones_like()?
        } else {
            (1.0 - ce.f_softmax(1, Kind::Float)?) / (m - 1) as f64
        };
        let wd = w.detach().f_to_kind(Kind::Float)?;
        let wc = &c * wd.f_unsqueeze(-1)?.f_unsqueeze(-1)?;
        let total = wd
            .f_sum_dim_intlist(1, true, Kind::Float)?
            .f_unsqueeze(-1)?
            .f_unsqueeze(-1)?;
        Ok(&wc
            / wc.f_sum_dim_intlist(1, true, Kind::Float)?
                .f_clamp_min(1e-12)?
            * total)
    })?;
    per_pixel_weighted_kd(
        student,
        teachers,
        &weights,
        targets,
        ignore_index,
        temperature,
    )
}

/// The KD term `[B]` of a segmentation batch with a weight per teacher and pixel: the sum over
/// teachers of the mean over each image's labelled pixels of `w[b, m, p] T^2 KL_m[b, p]`. The
/// weights carry no gradient.
///
/// # Shapes
/// `student [B, K, H, W]`, `teachers[m] [B, K, H, W]`, `w [B, M, H, W]`, `targets [B, H, W]`
/// -> `[B]`
pub fn per_pixel_weighted_kd(
    student: &Tensor,
    teachers: &[Tensor],
    w: &Tensor,
    targets: &Tensor,
    ignore_index: i64,
    temperature: f64,
) -> Result<Tensor> {
    let s = student.size();
    check_shape("per-pixel KD student logits", student, &[-1, -1, -1, -1])?;
    check_shape(
        "per-pixel teacher weights",
        w,
        &[s[0], teachers.len() as i64, s[2], s[3]],
    )?;
    let valid = valid_pixels(targets, ignore_index)?;
    let w = w.detach();
    let mut kd = Tensor::f_zeros([s[0]], (Kind::Float, student.device()))?;
    for (i, t) in teachers.iter().enumerate() {
        let kl = pixel_kd_kl(student, t, temperature)?;
        kd += masked_image_mean(&(kl * w.f_select(1, i as i64)?), &valid)?;
    }
    Ok(kd)
}
