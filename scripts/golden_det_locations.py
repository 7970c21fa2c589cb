"""Golden values for the meta mode's per-location detection signals and credit, and the KD term
with a weight per teacher and location (docs/METHOD.md section 14;
crates/vision-tasks/src/detection/loss.rs, `location_signals` and `location_weighted_kd`).

    $MTKD_TORCH_PYTHON scripts/golden_det_locations.py

Writes
  crates/vision-tasks/tests/golden/det_locations.json   read by crates/vision-tasks/tests/detection.rs

Written with autograd: the quiz is torchvision's sigmoid focal loss (alpha 0.25, gamma 2) summed
over each labelled image's locations and classes, divided by its positive count and averaged over
the labelled images; each teacher's KD term is the foreground-weighted binary KL of the class
logits at temperature T (times T^2), averaged over the batch; the credit at a location is
`kd_weight * B^2 * <d quiz / d z, d KD_m / d z>` over the classes there. Box KD is off
(`box_kd_weight = 0`) in the weighted term checked here. The `*_balanced_ce` values are the quiz
loss and credit of `location_quiz = "balanced-ce"`: the same focal loss with gamma 0.
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/vision-tasks/tests/golden/det_locations.json"


def tensor(t):
    t = t.detach().double()
    return {"shape": list(t.shape), "data": t.reshape(-1).tolist()}


def focal(z, y, alpha=0.25, gamma=2.0):
    p = torch.sigmoid(z)
    ce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t) ** gamma
    return (alpha * y + (1 - alpha) * (1 - y)) * loss


def class_kl(s, t, T):
    s, t = s / T, t / T
    pt = torch.sigmoid(t)
    kl = pt * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - pt) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.sum(1) * T * T  # [B, L]


def main():
    g = torch.Generator().manual_seed(20261206)
    B, K, L, M = 3, 3, 21, 2  # 16 x 16 input at strides 4, 8, 16
    T, kd_w = 2.0, 0.7
    out = torch.randn(B, K + 5, L, generator=g)
    out[:, K:K + 4] = out[:, K:K + 4].abs() + 0.5  # distances must be positive
    teachers = []
    for _ in range(M):
        t = torch.randn(B, K + 5, L, generator=g) * 2.0
        t[:, K:K + 4] = t[:, K:K + 4].abs() + 0.5
        teachers.append(t)
    classes = torch.full((B, L), -1, dtype=torch.long)
    classes[0, [2, 5, 17]] = torch.tensor([0, 2, 1])
    classes[1, [0, 9]] = torch.tensor([1, 1])
    classes[2, 3] = 2
    labelled = torch.tensor([True, True, False])
    pos = (classes >= 0).float()
    onehot = F.one_hot(classes.clamp_min(0), K).float() * pos.unsqueeze(-1)  # [B, L, K]
    onehot = onehot.transpose(1, 2)  # [B, K, L]
    npos = pos.sum(1).clamp_min(1.0)
    z = out[:, :K].clone().requires_grad_(True)
    rows = labelled.float()
    quiz = ((focal(z, onehot).sum((1, 2)) / npos) * rows).sum() / rows.sum().clamp_min(1.0)
    (gq,) = torch.autograd.grad(quiz, [z])
    quiz_bce = ((focal(z, onehot, gamma=0.0).sum((1, 2)) / npos) * rows).sum() / rows.sum().clamp_min(1.0)
    (gq_bce,) = torch.autograd.grad(quiz_bce, [z])
    ce, kl, ent, credit, credit_bce, fg = [], [], [], [], [], []
    for t in teachers:
        tc = t[:, :K]
        f = torch.maximum(torch.sigmoid(tc).amax(1), pos)
        per_loc = class_kl(z, tc, T)
        kd = ((per_loc * f).sum(1) / f.sum(1).clamp_min(1e-6)).sum() / B
        (gk,) = torch.autograd.grad(kd, [z])
        credit.append((gq * gk).sum(1) * kd_w * B * B)
        credit_bce.append((gq_bce * gk).sum(1) * kd_w * B * B)
        kl.append(per_loc.detach())
        ce.append(focal(tc, onehot).sum(1))
        p = torch.sigmoid(tc)
        ent.append(-(p * F.logsigmoid(tc) + (1 - p) * F.logsigmoid(-tc)).sum(1))
        fg.append(f)
    w = torch.softmax(torch.randn(B, M, L, generator=g), 1)
    weighted = sum(
        (class_kl(out[:, :K], teachers[m][:, :K], T) * fg[m] * w[:, m]).sum(1) / fg[m].sum(1).clamp_min(1e-6)
        for m in range(M)
    )
    data = {
        "temperature": T, "kd_weight": kd_w, "image": [16, 16], "strides": [4, 8, 16],
        "student": tensor(out), "teachers": [tensor(t) for t in teachers],
        "classes": classes.reshape(-1).tolist(), "labelled": labelled.tolist(),
        "quiz_loss": quiz.item(),
        "ce": tensor(torch.stack(ce, 1)), "kl": tensor(torch.stack(kl, 1)),
        "entropy": tensor(torch.stack(ent, 1)), "credit": tensor(torch.stack(credit, 1)),
        "quiz_loss_balanced_ce": quiz_bce.item(),
        "credit_balanced_ce": tensor(torch.stack(credit_bce, 1)),
        "weights": tensor(w), "weighted_kd": tensor(weighted), "torch": torch.__version__,
    }
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
