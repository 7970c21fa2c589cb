"""Golden values for the MTKD-RL agent's meta mode (docs/METHOD.md section 10;
crates/rl-weighting/src/meta.rs).

    $MTKD_TORCH_PYTHON scripts/golden_meta.py

Writes
  crates/rl-weighting/tests/golden/meta.json   read by crates/rl-weighting/tests/agent.rs

Written with autograd, independently of the Rust closed form: the student's classifier (W, b)
takes a *real* virtual SGD step (`torch.autograd.grad(..., create_graph=True)`) with teacher
weights w held as a leaf, the quiz loss is the cross-entropy of the virtually updated classifier
on the previous batch, and the credit is `-d quiz / d w`. The policy's features, running
normaliser, credit RMS, loss and `torch.optim.Adam` follow the section. Three batches in order,
for each quiz choice: with `previous`, the first only stores its quiz and the second and third
each update the policy before their weights; with `current`, every batch is its own quiz; with
`own`, each sample is scored on a real virtual step of its own term of the batch loss, one
sample at a time. `own-per-sample` is `own` with `advantage = "per-sample"` (each sample's
centred credit divided by its own RMS over the teachers instead of the running RMS).
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lookahead_reference import (  # noqa: E402
    lookahead_own_loss, lookahead_quiz_loss, random_batch, tensor)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/rl-weighting/tests/golden/meta.json"


class Norm:
    """Running mean / (biased) variance, merged per batch; output clipped to +-5."""

    def __init__(self, d):
        self.mean = torch.zeros(d)
        self.var = torch.ones(d)
        self.count = 0.0

    def __call__(self, x):
        b = x.shape[0]
        bm = x.mean(0)
        bv = x.var(0, unbiased=False)
        total = self.count + b
        delta = bm - self.mean
        new_mean = self.mean + delta * (b / total)
        m2 = self.var * self.count + bv * b + delta.square() * (self.count * b / total)
        self.var = m2 / total
        self.mean = new_mean
        self.count = total
        return ((x - self.mean) / (self.var + 1e-4).sqrt()).clamp(-5.0, 5.0)


def run(quiz_mode, advantage="running-rms"):
    g = torch.Generator().manual_seed(20261202)
    M, K, D, H, NF = 3, 5, 4, 8, 6
    T, ce_w, kd_w, inner_lr, lr, tau, decay = 4.0, 1.0, 0.7, 0.1, 0.01, 0.2, 0.99
    sizes = [6, 5, 7]

    l1 = torch.nn.Linear(NF, H)
    l2 = torch.nn.Linear(H, 1, bias=False)  # a shared score is ignored by the softmax
    teacher_bias = torch.nn.Parameter(torch.zeros(M))
    with torch.no_grad():
        for scale, layer in ((0.5, l1), (0.3, l2)):
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        teacher_bias.copy_(torch.randn(M, generator=g) * 0.2)
    params = {"l1.weight": l1.weight, "l1.bias": l1.bias, "l2.weight": l2.weight,
              "teacher_bias": teacher_bias}
    init = {k: tensor(v) for k, v in params.items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr, eps=1e-8)
    norm = Norm(NF)
    ms, count = 0.0, 0

    def policy(x):
        return F.softmax(l2(F.relu(l1(x))).squeeze(2) + teacher_bias, 1)

    batches = []
    quiz = None
    for b in sizes:
        zt, h, W, bias, y, zs, rec = random_batch(g, M, K, D, b)
        # Signals (docs/METHOD.md section 2): CE, T^2 KL(p_m || q), entropy at T = 1.
        logq = F.log_softmax(zs / T, 1)
        ce = torch.stack([F.cross_entropy(zt[m], y, reduction="none") for m in range(M)], 1)
        kl = torch.stack([(F.softmax(zt[m] / T, 1) * (F.log_softmax(zt[m] / T, 1) - logq)).sum(1) * T * T
                          for m in range(M)], 1)
        ent = torch.stack([-(F.softmax(zt[m], 1) * F.log_softmax(zt[m], 1)).sum(1) for m in range(M)], 1)
        feats = torch.stack([ce, kl, ent, torch.zeros_like(ce), ce - ce.mean(1, keepdim=True),
                             kl - kl.mean(1, keepdim=True)], 2)
        x = norm(feats.reshape(b * M, NF)).reshape(b, M, NF)
        if quiz_mode in ("current", "own"):
            quiz = (h, y)
        if quiz is not None:
            w = policy(x)
            leaf = w.detach().clone().requires_grad_(True)
            if quiz_mode == "own":
                quiz_loss = lookahead_own_loss(leaf, zt, h, W, bias, y, T, ce_w, kd_w, inner_lr)
            else:
                quiz_loss = lookahead_quiz_loss(leaf, zt, h, W, bias, y, quiz, T, ce_w, kd_w,
                                                inner_lr)
            (gw,) = torch.autograd.grad(quiz_loss, [leaf])
            credit = -gw / inner_lr  # per unit of the student's learning rate
            centred = credit - credit.mean(1, keepdim=True)
            ms = ms * decay + centred.double().square().mean().item() * (1 - decay)
            count += 1
            rms = (ms / (1 - decay ** count)) ** 0.5
            if advantage == "per-sample":
                # Each sample's centred credit over its own RMS across teachers, floored at a
                # thousandth of the running RMS (`advantage = "per-sample"`).
                own = centred.square().mean(1, keepdim=True).sqrt()
                adv = (centred / own.clamp_min(rms * 1e-3)).detach()
            else:
                adv = (centred / rms).detach()
            entropy = -(w * w.clamp_min(1e-12).log()).sum(1)
            pl = -(w * adv).sum(1).mean() - tau * entropy.mean()
            opt.zero_grad()
            pl.backward()
            opt.step()
            rec["quiz_loss"] = quiz_loss.item()
            rec["credit"] = tensor(credit)
            rec["params_after"] = {k: tensor(v) for k, v in params.items()}
        with torch.no_grad():
            rec["weights"] = tensor(policy(x))
        quiz = (h, y)
        batches.append(rec)

    return {
        "M": M, "K": K, "hidden": H, "temperature": T, "ce_weight": ce_w, "kd_weight": kd_w,
        "inner_lr": inner_lr, "meta_lr": lr, "entropy": tau, "init": init, "batches": batches,
        "torch": torch.__version__,
    }


def main():
    out = {"previous": run("previous"), "current": run("current"), "own": run("own"),
           "own-per-sample": run("own", "per-sample")}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
