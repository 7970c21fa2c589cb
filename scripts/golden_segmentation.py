"""Golden values for segmentation: the dense losses, the pooled per-image signals and the metrics.

    cargo xtask golden            # or: $MTKD_TORCH_PYTHON scripts/golden_segmentation.py

Writes crates/vision-tasks/tests/golden/segmentation.json. The losses are written with plain
torch.nn.functional calls; the metrics with NumPy alone (a confusion matrix from np.bincount,
IoU = TP / (TP + FP + FN), mIoU = the nan-mean over classes, pixel accuracy over labelled
pixels), independent of the Rust code that `crates/vision-tasks/tests/segmentation.rs` checks.
Pixels labelled 255 are unlabelled everywhere.
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
IGNORE = 255


def tensor(t):
    return {"shape": list(t.shape), "data": [float(x) for x in t.detach().reshape(-1).tolist()]}


def masked_mean(per_pixel, valid):
    return (per_pixel * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)


def metrics(pred, truth, k):
    t = truth.reshape(-1)
    p = pred.reshape(-1)
    keep = t != IGNORE
    t, p = t[keep], p[keep]
    cm = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, 100.0 * tp / union, np.nan)
    return {
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
        "miou": float(np.nanmean(iou)),
        "pixel_accuracy": float(100.0 * tp.sum() / max(cm.sum(), 1)),
        "confusion": cm.tolist(),
    }


def case(name, seed, B, K, H, W, T, M, absent=None, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, K, H, W, generator=g) * scale
    teachers = [torch.randn(B, K, H, W, generator=g) * scale for _ in range(M)]
    y = torch.randint(0, K, (B, H, W), generator=g)
    if absent is not None:
        y[y == absent] = (absent + 1) % K
        zs[:, absent] -= 100.0  # never predicted either: no IoU for this class
    drop = torch.rand(B, H, W, generator=g) < 0.2
    y[drop] = IGNORE
    y[-1] = IGNORE  # an image without one labelled pixel
    valid = (y != IGNORE).float()
    ce = masked_mean(F.cross_entropy(zs, y, ignore_index=IGNORE, reduction="none"), valid)
    out = {"name": name, "T": T, "zs": tensor(zs), "y": tensor(y.float()),
           "teachers": [tensor(t) for t in teachers], "ce": ce.tolist(),
           "teacher_ce": [], "kd": [], "cwd": [], "entropy": [], "pooled": []}
    for zt in teachers:
        out["teacher_ce"].append(masked_mean(F.cross_entropy(zt, y, ignore_index=IGNORE, reduction="none"), valid).tolist())
        kl = (T * T) * F.kl_div(F.log_softmax(zs / T, 1), F.log_softmax(zt / T, 1), reduction="none", log_target=True).sum(1)
        out["kd"].append(masked_mean(kl, valid).tolist())
        # CWD: per channel a distribution over the H*W locations.
        ps = F.log_softmax(zs.flatten(2) / T, -1)
        pt = F.log_softmax(zt.flatten(2) / T, -1)
        out["cwd"].append(((T * T) * (pt.exp() * (pt - ps)).sum(-1).mean(-1)).tolist())
        ent = -(F.softmax(zt, 1) * F.log_softmax(zt, 1)).sum(1)
        out["entropy"].append(masked_mean(ent, valid).tolist())
        v = valid[:, None]
        out["pooled"].append(tensor((zt * v).sum((2, 3)) / v.sum((2, 3)).clamp_min(1.0)))
    # Per-pixel teacher weights (docs/METHOD.md section 13) from random per-image weights.
    w = torch.rand(B, M, generator=g)
    ce_pix = torch.stack([F.cross_entropy(zt, y, ignore_index=IGNORE, reduction="none") for zt in teachers], 1)
    conf = (1 - F.softmax(ce_pix, 1)) / (M - 1) if M > 1 else torch.ones_like(ce_pix)
    wc = conf * w[:, :, None, None]
    wp = wc / wc.sum(1, keepdim=True).clamp_min(1e-12) * w.sum(1)[:, None, None, None]
    pix = torch.zeros(B)
    for m, zt in enumerate(teachers):
        kl = (T * T) * F.kl_div(F.log_softmax(zs / T, 1), F.log_softmax(zt / T, 1), reduction="none", log_target=True).sum(1)
        pix += masked_mean(kl * wp[:, m], valid)
    out["w"] = tensor(w)
    out["pixel_weighted_kd"] = pix.tolist()
    out["metrics"] = metrics(zs.argmax(1).numpy(), y.numpy(), K)
    return out


def main():
    cases = [
        case("small", 0, B=3, K=4, H=5, W=6, T=2.0, M=2),
        case("absent-class", 1, B=4, K=5, H=8, W=8, T=4.0, M=3, absent=2),
    ]
    path = ROOT / "crates/vision-tasks/tests/golden/segmentation.json"
    path.write_text(json.dumps({"torch": torch.__version__, "numpy": np.__version__, "cases": cases}) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
