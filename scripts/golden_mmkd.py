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
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lookahead_reference import lookahead_quiz_loss, random_batch, tensor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/distill-core/tests/golden/mmkd.json"


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
        zt, h, W, bias, y, zs, rec = random_batch(g, M, K, D, b)
        x = torch.cat(list(zt) + [zs], 1)
        if quiz is not None:
            w = net(x)
            meta = lookahead_quiz_loss(w, zt, h, W, bias, y, quiz, T, ce_w, kd_w, inner_lr)
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
