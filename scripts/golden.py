"""Regenerate the golden files that the Rust tests compare against (values computed by PyTorch).

    cargo xtask golden            # or: $MTKD_TORCH_PYTHON scripts/golden.py

Writes
  crates/distill-core/tests/golden/core.json        losses, signals, adapter
  crates/rl-weighting/tests/golden/components.json  confidence, gaps, fixed mix

Every input is drawn from a seeded torch generator and stored in the file, so the Rust side reads
the inputs and recomputes; the formulas are docs/METHOD.md sections 1-3, written here with plain
torch.nn.functional calls.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def flat(t):
    return [float(x) for x in t.detach().reshape(-1).tolist()]


def core_case(name, seed, B, K, T, s_map, t_map, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, K, generator=g) * scale
    zt = torch.randn(B, K, generator=g) * scale
    y = torch.randint(0, K, (B,), generator=g)
    fs = torch.randn(B, *s_map, generator=g)
    ft = torch.randn(B, *t_map, generator=g)

    ce = F.cross_entropy(zs, y, reduction="none")
    kl = (T * T) * F.kl_div(F.log_softmax(zs / T, 1), F.log_softmax(zt / T, 1), reduction="none", log_target=True).sum(1)
    p = F.softmax(zt, 1)
    entropy = -(p * F.log_softmax(zt, 1)).sum(1)
    top1 = (zs.argmax(1) == y).float()
    top5 = (zs.topk(min(5, K), 1).indices == y[:, None]).any(1).float()

    # Adapter (docs/METHOD.md section 1): resize, 1x1 conv with bias, BN (training mode), ReLU.
    torch.manual_seed(seed)
    conv = nn.Conv2d(s_map[0], t_map[0], 1, bias=True)
    bn = nn.BatchNorm2d(t_map[0])
    with torch.no_grad():
        bn.weight.copy_(torch.rand(t_map[0], generator=g) + 0.5)
        bn.bias.copy_(torch.randn(t_map[0], generator=g) * 0.1)
    hs, ws = s_map[1:]
    ht, wt = t_map[1:]
    if (hs, ws) == (ht, wt):
        r = fs
    elif hs >= ht and ws >= wt:
        r = F.adaptive_avg_pool2d(fs, (ht, wt))
    else:
        r = F.interpolate(fs, size=(ht, wt), mode="bilinear", align_corners=False)
    proj = F.relu(bn(conv(r)))
    mse = ((proj - ft) ** 2).flatten(1).mean(1)
    emb_t = ft.mean((2, 3))
    cos = F.cosine_similarity(proj.mean((2, 3)), emb_t, dim=1, eps=1e-8)
    return {
        "name": name,
        "temperature": T,
        "student_logits": {"shape": [B, K], "data": flat(zs)},
        "teacher_logits": {"shape": [B, K], "data": flat(zt)},
        "labels": [int(v) for v in y.tolist()],
        "student_map": {"shape": [B, *s_map], "data": flat(fs)},
        "teacher_map": {"shape": [B, *t_map], "data": flat(ft)},
        "adapter": {
            "conv.weight": {"shape": list(conv.weight.shape), "data": flat(conv.weight)},
            "conv.bias": {"shape": list(conv.bias.shape), "data": flat(conv.bias)},
            "bn.weight": {"shape": list(bn.weight.shape), "data": flat(bn.weight)},
            "bn.bias": {"shape": list(bn.bias.shape), "data": flat(bn.bias)},
        },
        "expected": {
            "cross_entropy": flat(ce),
            "kd_kl": flat(kl),
            "entropy": flat(entropy),
            "top1": flat(top1),
            "top5": flat(top5),
            "adapter_out": {"shape": list(proj.shape), "data": flat(proj)},
            "feature_mse": flat(mse),
            "cosine": flat(cos),
            "bn_running_mean": flat(bn.running_mean),
            "bn_running_var": flat(bn.running_var),
        },
    }


def components_case(name, seed, B, M):
    g = torch.Generator().manual_seed(seed)
    ce = torch.rand(B, M, generator=g) * 3
    kl = torch.rand(B, M, generator=g) * 16
    cos = torch.rand(B, M, generator=g) * 2 - 1
    a = F.softmax(torch.randn(B, M, generator=g), 1)
    if M > 1:
        conf = (1 - F.softmax(ce, 1)) / (M - 1)
    else:
        conf = torch.ones_like(ce)  # clean-mode definition for one teacher (docs/METHOD.md section 7.1)
    dl = F.softmax(kl, 1)
    df = F.softmax(cos, 1)
    return {
        "name": name,
        "shape": [B, M],
        "ce": flat(ce),
        "kl": flat(kl),
        "cos": flat(cos),
        "agent": flat(a),
        "expected": {
            "confidence": flat(conf),
            "logit_gap": flat(dl),
            "feature_gap": flat(df),
            "fixed_mix_logit": flat((a + conf + dl) / 3),
        },
    }


def main():
    torch.set_default_dtype(torch.float32)
    core = {
        "torch_version": torch.__version__,
        "cases": [
            core_case("same-size maps", 1, 6, 10, 4.0, (8, 4, 4), (16, 4, 4)),
            core_case("student map larger (adaptive pool)", 2, 5, 7, 2.0, (4, 8, 8), (6, 4, 4)),
            core_case("student map smaller (bilinear)", 3, 4, 100, 4.0, (8, 3, 3), (5, 7, 7)),
            core_case("temperature 1, large logits", 4, 3, 5, 1.0, (2, 2, 2), (3, 2, 2), scale=20.0),
        ],
    }
    comps = {
        "torch_version": torch.__version__,
        "cases": [components_case("four teachers", 11, 8, 4), components_case("two teachers", 12, 5, 2), components_case("one teacher", 13, 3, 1)],
    }
    out1 = ROOT / "crates/distill-core/tests/golden/core.json"
    out2 = ROOT / "crates/rl-weighting/tests/golden/components.json"
    for path, obj in ((out1, core), (out2, comps)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
