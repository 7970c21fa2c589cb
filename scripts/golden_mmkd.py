"""Golden values for the MMKD baseline (docs/METHOD.md section 8; mtkd's choices in
crates/distill-core/src/mmkd.rs).

    $MTKD_TORCH_PYTHON scripts/golden_mmkd.py

Writes
  crates/distill-core/tests/golden/mmkd.json   read by crates/distill-core/tests/mmkd.rs

The reference is written with autograd, independently of the Rust closed form: the student's
classifier (W, b) takes a *real* virtual SGD step, `torch.autograd.grad(L, [W, b],
create_graph=True)` with L = mean(ce_w CE + kd_w sum_m w_m T^2 KL(p_m || q)), the quiz loss is
the cross-entropy of the virtually updated classifier on the previous batch's embeddings, and
`torch.optim.Adam` moves the weight network. Three batches go through in order: the first only
stores its quiz, the second and third each make one meta-update before their weights.
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/distill-core/tests/golden/mmkd.json"


def tensor(t):
    return {"shape": list(t.shape), "data": [float(x) for x in t.detach().reshape(-1).tolist()]}


def main():
    g = torch.Generator().manual_seed(20261127)
    M, K, D, H = 3, 5, 4, 8
    T, ce_w, kd_w, inner_lr, lr = 4.0, 1.0, 0.7, 0.1, 0.01
    sizes = [6, 5, 7]

    l1 = torch.nn.Linear((M + 1) * K, H)
    l2 = torch.nn.Linear(H, M)
    with torch.no_grad():
        for scale, layer in ((0.3, l1), (0.1, l2)):
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    init = {
        "l1.weight": tensor(l1.weight),
        "l1.bias": tensor(l1.bias),
        "l2.weight": tensor(l2.weight),
        "l2.bias": tensor(l2.bias),
    }
    opt = torch.optim.Adam(list(l1.parameters()) + list(l2.parameters()), lr=lr, eps=1e-8)

    def net(x):
        return F.softmax(l2(F.relu(l1(x))), 1)

    batches = []
    quiz = None
    for b in sizes:
        zt = torch.randn(M, b, K, generator=g) * 2.0
        h = torch.randn(b, D, generator=g)
        W = torch.randn(K, D, generator=g) * 0.5
        bias = torch.randn(K, generator=g) * 0.1
        y = torch.randint(0, K, (b,), generator=g)
        zs = h @ W.t() + bias
        x = torch.cat(list(zt) + [zs], 1)
        rec = {
            "teacher_logits": tensor(zt),
            "embedding": tensor(h),
            "weight": tensor(W),
            "bias": tensor(bias),
            "labels": [int(v) for v in y.tolist()],
        }
        if quiz is not None:
            hq, yq = quiz
            w = net(x)
            Wv = W.clone().requires_grad_(True)
            bv = bias.clone().requires_grad_(True)
            z = h @ Wv.t() + bv
            logq = F.log_softmax(z / T, 1)
            kd = torch.zeros(b)
            for m in range(M):
                p = F.softmax(zt[m] / T, 1)
                kl = (p * (torch.log(p) - logq)).sum(1) * T * T
                kd = kd + w[:, m] * kl
            loss = (ce_w * F.cross_entropy(z, y, reduction="none") + kd_w * kd).mean()
            gW, gb = torch.autograd.grad(loss, [Wv, bv], create_graph=True)
            zq = hq @ (W - inner_lr * gW).t() + (bias - inner_lr * gb)
            meta = F.cross_entropy(zq, yq)
            opt.zero_grad()
            meta.backward()
            meta = meta.detach()
            opt.step()
            rec["quiz_loss"] = meta.item()
            rec["params_after"] = {
                "l1.weight": tensor(l1.weight),
                "l1.bias": tensor(l1.bias),
                "l2.weight": tensor(l2.weight),
                "l2.bias": tensor(l2.bias),
            }
        with torch.no_grad():
            rec["weights"] = tensor(net(x))
        quiz = (h, y)
        batches.append(rec)

    out = {
        "M": M,
        "K": K,
        "hidden": H,
        "temperature": T,
        "ce_weight": ce_w,
        "kd_weight": kd_w,
        "inner_lr": inner_lr,
        "lr": lr,
        "init": init,
        "batches": batches,
        "torch": torch.__version__,
    }
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
