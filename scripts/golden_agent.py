"""Golden values for the published ("parity") MTKD-RL agent, computed by PyTorch.

    $MTKD_TORCH_PYTHON scripts/golden_agent.py
    # e.g. /root/.cache/mtkd/torch-2.13.0/bin/python scripts/golden_agent.py

Writes crates/rl-weighting/tests/golden/agent.json.

What it computes (docs/METHOD.md sections 2, 3 and 5, parity mode, float32 throughout):
  - state per sample: concat over teachers m = 0..M-1 of [cos_m, kl_m, ce_m, e_m (C_m), z_m (K)],
    so D = sum_m (C_m + K + 3);
  - policy: stem Linear(D -> 128, no bias) -> ReLU; logit_head / feature_head Linear(128 -> M)
    -> softmax over teachers -> a_l / a_f (torch default init under torch.manual_seed(0), created
    in the order stem, logit_head, feature_head);
  - c = (1 - softmax(CE, 1)) / (M - 1), d_l = softmax(KL, 1), d_f = softmax(COS, 1);
  - fixed mix w = (a + c + d) / 3; dynamic mix w = softmax(theta) . [a, c, d], theta init ones;
  - reward r = -L, r_hat = clamp((r - mean r) / std_unbiased(r), 0, 1);
  - agent loss = mean_{b,m}(-r_hat_b * clamp(log w_l, min=-100)) + same for w_f
    (r_hat, c, d_l, d_f and the state are constants);
  - update: one SGD (lr 0.1, no momentum, no weight decay) over the agent parameters; for batch 0
    then batch 1: zero_grad, recompute with the current parameters, loss, backward, step.
    "fixed": parameters are the five Linear tensors; "dynamic": also theta_logit, theta_feature.

Every input and every initial parameter is stored, so the Rust side loads them and recomputes.
Tensors are {"shape": [...], "data": [flat row-major]}. Numbers are written as the shortest
decimal that reads back (via f64, then rounded to f32, as `as_f64() as f32` does) to the exact
float32 value; the script asserts that round trip for every number it writes.

NaN (not representable in JSON) is written as null: the two edge cases "r_hat_batch_of_one"
(B = 1: the unbiased std of one value is NaN) and "r_hat_equal_losses" (std 0: 0 / 0 = NaN)
document the defect of the published code (docs/METHOD.md section 7.2); torch gives NaN there.
"""
import json
import math
import struct
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/rl-weighting/tests/golden/agent.json"

M, K, C, B, HIDDEN, LR = 3, 5, [4, 6, 3], 6, 128, 0.1
INPUT_SEED = 20250227
LINEAR_NAMES = ["stem.weight", "logit_head.weight", "logit_head.bias", "feature_head.weight", "feature_head.bias"]
THETA_NAMES = ["theta_logit", "theta_feature"]


def f32_to_json(x):
    """Shortest decimal that round-trips (through f64) to the float32 value x; NaN -> None."""
    x = float(x)
    if math.isnan(x):
        return None
    assert math.isfinite(x), x
    bits = struct.pack("<f", x)
    for p in range(1, 18):
        s = float(f"{x:.{p}g}")
        if struct.pack("<f", s) == bits:
            return s
    raise AssertionError(x)


def tensor(t):
    t = t.detach().to(torch.float32)
    return {"shape": list(t.shape), "data": [f32_to_json(v) for v in t.reshape(-1).tolist()]}


def scalar(t):
    return f32_to_json(t.detach().to(torch.float32).item())


def make_batch(g):
    # Draw logits and embeddings interleaved per teacher (z_0, e_0, z_1, e_1, ...).
    z, e = [], []
    for m in range(M):
        z.append(torch.randn(B, K, generator=g) * 3)
        e.append(torch.randn(B, C[m], generator=g))
    ce = torch.rand(B, M, generator=g) * 3
    kl = torch.rand(B, M, generator=g) * 10
    cos = torch.rand(B, M, generator=g) * 2 - 1
    loss = torch.rand(B, generator=g) * 4 + 1
    return {"z": z, "e": e, "ce": ce, "kl": kl, "cos": cos, "loss": loss}


def build_state(bt):
    parts = []
    for m in range(M):
        parts += [bt["cos"][:, m : m + 1], bt["kl"][:, m : m + 1], bt["ce"][:, m : m + 1], bt["e"][m], bt["z"][m]]
    return torch.cat(parts, dim=1)


def r_hat_of(loss):
    r = -loss
    return torch.clamp((r - r.mean()) / r.std(unbiased=True), 0, 1)


class Agent(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.stem = nn.Linear(d, HIDDEN, bias=False)
        self.logit_head = nn.Linear(HIDDEN, M)
        self.feature_head = nn.Linear(HIDDEN, M)
        self.theta_logit = nn.Parameter(torch.ones(3))
        self.theta_feature = nn.Parameter(torch.ones(3))

    def forward(self, state):
        h = F.relu(self.stem(state))
        return F.softmax(self.logit_head(h), 1), F.softmax(self.feature_head(h), 1)


def hand_crafted(bt):
    c = (1 - F.softmax(bt["ce"], 1)) / (M - 1)
    return c, F.softmax(bt["kl"], 1), F.softmax(bt["cos"], 1)


def mix(agent, mode, a_l, a_f, c, d_l, d_f):
    if mode == "fixed":
        return (a_l + c + d_l) / 3, (a_f + c + d_f) / 3
    s_l = F.softmax(agent.theta_logit, 0)
    s_f = F.softmax(agent.theta_feature, 0)
    return s_l[0] * a_l + s_l[1] * c + s_l[2] * d_l, s_f[0] * a_f + s_f[1] * c + s_f[2] * d_f


def agent_loss(w_l, w_f, r_hat):
    rh = r_hat[:, None]
    return (-rh * torch.clamp(torch.log(w_l), min=-100)).mean() + (-rh * torch.clamp(torch.log(w_f), min=-100)).mean()


def run_mode(init_state, mode, batches, states, r_hats, d):
    agent = Agent(d)
    agent.load_state_dict(init_state)
    names = LINEAR_NAMES + (THETA_NAMES if mode == "dynamic" else [])
    params = dict(agent.named_parameters())
    opt = torch.optim.SGD([params[n] for n in names], lr=LR, momentum=0, weight_decay=0)
    first = None
    for i, bt in enumerate(batches):
        opt.zero_grad()
        with torch.no_grad():
            c, d_l, d_f = hand_crafted(bt)
        a_l, a_f = agent(states[i])
        w_l, w_f = mix(agent, mode, a_l, a_f, c, d_l, d_f)
        loss = agent_loss(w_l, w_f, r_hats[i])
        if i == 0:
            first = (w_l.detach().clone(), w_f.detach().clone(), loss.detach().clone())
        loss.backward()
        opt.step()
    after = {n: params[n].detach().clone() for n in names}
    if mode == "fixed":
        for n in THETA_NAMES:
            assert torch.equal(params[n].detach(), init_state[n]), n
    return first, after


def main():
    torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(INPUT_SEED)
    batches = [make_batch(g), make_batch(g)]
    states = [build_state(bt) for bt in batches]
    d = sum(cm + K + 3 for cm in C)
    assert states[0].shape == (B, d)
    r_hats = [r_hat_of(bt["loss"]) for bt in batches]

    torch.manual_seed(0)
    agent0 = Agent(d)
    init_state = {n: p.detach().clone() for n, p in agent0.state_dict().items()}
    assert sorted(init_state) == sorted(LINEAR_NAMES + THETA_NAMES), list(init_state)

    with torch.no_grad():
        a_l, a_f = agent0(states[0])
        c, d_l, d_f = hand_crafted(batches[0])

    results = {}
    for mode in ("fixed", "dynamic"):
        (w_l, w_f, loss), after = run_mode(init_state, mode, batches, states, r_hats, d)
        assert torch.allclose(w_l.sum(1), torch.ones(B), atol=1e-5) and torch.allclose(w_f.sum(1), torch.ones(B), atol=1e-5)
        results[mode] = {
            "w_l": tensor(w_l),
            "w_f": tensor(w_f),
            "agent_loss": scalar(loss),
            "params_after_update": {n: tensor(t) for n, t in after.items()},
        }
        delta = max((after[n] - init_state[n]).abs().max().item() for n in after)
        print(f"{mode}: agent_loss {loss.item():.6f}, max |param change| {delta:.6g}")

    # Edge cases of the published reward normalisation (docs/METHOD.md section 7.2).
    one = torch.tensor([2.75])
    equal = torch.full((4,), 2.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that std of one value has no degrees of freedom
        r_one = r_hat_of(one)
        r_equal = r_hat_of(equal)
    assert torch.isnan(r_one).all() and torch.isnan(r_equal).all()

    out = {
        "torch_version": torch.__version__,
        "M": M,
        "K": K,
        "C": C,
        "B": B,
        "D": d,
        "hidden": HIDDEN,
        "lr": LR,
        "batches": [
            {
                "teacher_logits": [tensor(z) for z in bt["z"]],
                "teacher_embeddings": [tensor(e) for e in bt["e"]],
                "ce": tensor(bt["ce"]),
                "kl": tensor(bt["kl"]),
                "cos": tensor(bt["cos"]),
                "loss": tensor(bt["loss"]),
            }
            for bt in batches
        ],
        "initial_params": {n: tensor(init_state[n]) for n in LINEAR_NAMES + THETA_NAMES},
        "expected": {
            "state": [tensor(s) for s in states],
            "a_l": tensor(a_l),
            "a_f": tensor(a_f),
            "confidence": tensor(c),
            "logit_gap": tensor(d_l),
            "feature_gap": tensor(d_f),
            "fixed": results["fixed"],
            "dynamic": results["dynamic"],
            "r_hat": [tensor(r) for r in r_hats],
        },
        "r_hat_batch_of_one": {
            "note": "published code: unbiased std of one value is NaN, so r_hat is NaN (null = NaN)",
            "loss": tensor(one),
            "r_hat": tensor(r_one),
        },
        "r_hat_equal_losses": {
            "note": "published code: all losses equal, std 0, 0/0 = NaN (null = NaN)",
            "loss": tensor(equal),
            "r_hat": tensor(r_equal),
        },
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes), D = {d}")


if __name__ == "__main__":
    main()
