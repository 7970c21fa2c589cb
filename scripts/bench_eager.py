"""The eager-PyTorch reference of the performance report (docs/PERF.md, `cargo xtask bench`): the
same training step as mtkd's, written as a PyTorch user writes it, with the same TorchScript
teachers, on the plan that `mtkd bench-steps` prints (student, input, classes, batch, loss weights,
teacher files).

    $MTKD_TORCH_PYTHON scripts/bench_eager.py --plan PLAN.json --modes ce,kd1,aver,mtkd-rl \
        --warmup 3 --steps 10 --json OUT.json [--flops]

The step (docs/METHOD.md sections 2-5): teachers in torch.no_grad (eval mode); the student
(scripts/student_zoo.py, its PyTorch twin) in train mode; per-sample CE; per teacher the
temperature-scaled KL (x T^2) and, with feature KD, an adapter (1x1 conv + BN + ReLU, resized
by adaptive average pooling) and the per-sample feature MSE; the weights per mode: kd1 = the
first teacher, aver = 1/M, mtkd-rl = the published agent (parity mode, fixed mix): state
[cos_m, kl_m, ce_m, teacher embedding, teacher logits] per teacher -> Linear(D, hidden, no bias)
-> ReLU -> two Linear(hidden, M) heads -> softmax, mixed with (1 - softmax(CE)) / (M - 1) and
softmax(KL) / softmax(COS) as (a + c + d) / 3; the state and the loss are kept for the agent's
update at the end of the epoch (one SGD step per stored batch, reward clamp((r - mean) / std, 0, 1)),
which is timed with the steps as mtkd's is. SGD with momentum, Nesterov and weight decay as the
plan says. Inputs are random (the step's cost does not depend on pixel values).
--flops counts the floating-point operations of one step per mode (torch.utils.flop_counter,
2 per multiply-add; the teachers' TorchScript graphs are counted too) for the GFLOP/s figures.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import student_zoo  # noqa: E402


class Adapter(nn.Module):
    def __init__(self, cs, ct, hw):
        super().__init__()
        self.conv = nn.Conv2d(cs, ct, 1)
        self.bn = nn.BatchNorm2d(ct)
        self.hw = hw

    def forward(self, f):
        if tuple(f.shape[2:]) != self.hw:
            if f.shape[2] >= self.hw[0]:
                f = F.adaptive_avg_pool2d(f, self.hw)
            else:
                f = F.interpolate(f, size=self.hw, mode="bilinear", align_corners=False)
        return F.relu(self.bn(self.conv(f)))


class Agent(nn.Module):
    def __init__(self, d, hidden, m):
        super().__init__()
        self.stem = nn.Linear(d, hidden, bias=False)
        self.logit_head = nn.Linear(hidden, m)
        self.feature_head = nn.Linear(hidden, m)

    def forward(self, s):
        h = F.relu(self.stem(s))
        return F.softmax(self.logit_head(h), 1), F.softmax(self.feature_head(h), 1)


class Step:
    def __init__(self, plan, mode, teachers):
        torch.manual_seed(0)
        c, h, w = plan["input"]
        k = plan["num_classes"]
        self.plan, self.mode, self.k = plan, mode, k
        self.teachers = [] if mode == "ce" else (teachers[:1] if mode == "kd1" else teachers)
        self.student = student_zoo.build(plan["student"], c, k).train()
        probe = torch.zeros(2, c, h, w)
        with torch.no_grad():
            _, fs = self.student.eval()(probe)
            self.student.train()
            touts = [t(probe) for t in self.teachers]
        self.feat = plan["feature_weight"] > 0 and mode != "ce"
        self.adapters = nn.ModuleList(
            Adapter(fs.shape[1], o[1].shape[1], tuple(o[1].shape[2:])) for o in touts
        ) if self.feat else nn.ModuleList()
        params = list(self.student.parameters()) + list(self.adapters.parameters())
        self.opt = torch.optim.SGD(params, lr=plan["lr"], momentum=plan["momentum"],
                                   nesterov=plan["nesterov"], weight_decay=plan["weight_decay"])
        self.agent = None
        if mode == "mtkd-rl":
            m = len(self.teachers)
            d = sum(o[1].shape[1] + k + 3 for o in touts)
            self.agent = Agent(d, plan["agent_hidden"], m)
            self.agent_opt = torch.optim.SGD(self.agent.parameters(), lr=plan["agent_lr"])
            self.buffer = []

    def __call__(self, x, y):
        p, t = self.plan, self.plan["temperature"]
        logits, fs = self.student(x)
        ce = F.cross_entropy(logits, y, reduction="none")
        if not self.teachers:
            loss = ce.mean()
        else:
            with torch.no_grad():
                touts = [m(x) for m in self.teachers]
            log_q = F.log_softmax(logits / t, 1)
            kls, mses, coss, embs = [], [], [], []
            for i, (zt, ft) in enumerate(touts):
                log_p = F.log_softmax(zt / t, 1)
                kls.append((log_p.exp() * (log_p - log_q)).sum(1) * t * t)
                if self.feat:
                    proj = self.adapters[i](fs)
                    mses.append((proj - ft).square().flatten(1).mean(1))
                    e = F.adaptive_avg_pool2d(ft, 1).flatten(1)
                    coss.append(F.cosine_similarity(F.adaptive_avg_pool2d(proj, 1).flatten(1).detach(), e, 1))
                    embs.append(e)
            kl = torch.stack(kls, 1)
            m = kl.shape[1]
            if self.mode == "kd1" or m == 1:
                w_l = w_f = torch.ones_like(kl)
            elif self.mode == "aver":
                w_l = w_f = torch.full_like(kl, 1.0 / m)
            else:
                with torch.no_grad():
                    ce_t = torch.stack([F.cross_entropy(zt, y, reduction="none") for zt, _ in touts], 1)
                    cos = torch.stack(coss, 1) if coss else torch.zeros_like(kl)
                    parts = []
                    for i in range(m):
                        parts += [cos[:, i:i + 1], kl[:, i:i + 1].detach(), ce_t[:, i:i + 1],
                                  embs[i] if embs else torch.zeros(kl.shape[0], 0), touts[i][0]]
                    state = torch.cat(parts, 1)
                    a_l, a_f = self.agent(state)
                    c = (1 - F.softmax(ce_t, 1)) / (m - 1)
                    w_l = (a_l + c + F.softmax(kl.detach(), 1)) / 3
                    w_f = (a_f + c + F.softmax(cos, 1)) / 3
            per = p["ce_weight"] * ce + p["kd_weight"] * (w_l * kl).sum(1)
            if self.feat:
                per = per + p["feature_weight"] * (w_f * torch.stack(mses, 1)).sum(1)
            loss = per.mean()
            if self.agent is not None:
                self.buffer.append((state, c, F.softmax(kl.detach(), 1), F.softmax(cos, 1), per.detach()))
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def end_epoch(self):
        if self.agent is None:
            return
        for state, c, d_l, d_f, loss in self.buffer:
            r = -loss
            r_hat = torch.clamp((r - r.mean()) / r.std(), 0, 1)[:, None]
            a_l, a_f = self.agent(state)
            w_l, w_f = (a_l + c + d_l) / 3, (a_f + c + d_f) / 3
            al = (-r_hat * torch.clamp(torch.log(w_l), min=-100)).mean() + \
                (-r_hat * torch.clamp(torch.log(w_f), min=-100)).mean()
            self.agent_opt.zero_grad()
            al.backward()
            self.agent_opt.step()
        self.buffer = []


def read_safetensors(path):
    """The tensors of a .safetensors file (8-byte little-endian header size, JSON header, data)."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    dtypes = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "BF16": torch.bfloat16, "F16": torch.float16}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        buf = bytearray(raw[8 + n + a:8 + n + b])
        t = torch.frombuffer(buf, dtype=dtypes[meta["dtype"]]) if buf else torch.empty(0, dtype=dtypes[meta["dtype"]])
        out[name] = t.reshape(meta["shape"]).clone()
    return out


def native_teacher(arch, weights, shape, num_classes):
    """A teacher trained by mtkd, rebuilt as its PyTorch twin (scripts/student_zoo.py, the same
    parameter names) with its weights, in eval mode; run through TorchScript like a user's."""
    model = student_zoo.build(arch, shape[0], num_classes)
    state = read_safetensors(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"bench_eager: {weights} does not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    with torch.no_grad():
        return torch.jit.trace(model, torch.zeros(2, *shape))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--modes", default="ce,kd1,aver,mtkd-rl")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--flops", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    plan = json.loads(args.plan.read_text())
    plan = plan.get("plan", plan)
    if args.threads:
        torch.set_num_threads(args.threads)
    c, h, w = plan["input"]
    teachers = []
    natives = plan.get("native_teachers") or [None] * len(plan["teachers"])
    for f, native in zip(plan["teachers"], natives):
        if f is not None:
            teachers.append(torch.jit.load(f, map_location="cpu").eval())
        elif native is not None:
            teachers.append(native_teacher(native[0], native[1], (c, h, w), plan["num_classes"]))
        else:
            raise SystemExit("bench_eager: a teacher of the plan is neither TorchScript nor trained by mtkd")
    b = plan["batch_size"]
    g = torch.Generator().manual_seed(0)
    n = args.warmup + args.steps
    xs = [torch.randn(b, c, h, w, generator=g) for _ in range(n)]
    ys = [torch.randint(0, plan["num_classes"], (b,), generator=g) for _ in range(n)]
    out = []
    for mode in args.modes.split(","):
        step = Step(plan, mode, teachers)
        for i in range(args.warmup):
            step(xs[i], ys[i])
        step.end_epoch()
        times, teacher_s = [], 0.0
        for i in range(args.warmup, n):
            t0 = time.perf_counter()
            step(xs[i], ys[i])
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step.end_epoch()
        end = time.perf_counter() - t0
        # The teachers' share, timed apart (the same forwards, after the steps).
        if step.teachers:
            with torch.no_grad():
                t0 = time.perf_counter()
                for i in range(args.warmup, n):
                    [m(xs[i]) for m in step.teachers]
                teacher_s = time.perf_counter() - t0
        rec = {
            "mode": mode,
            "batch_size": b,
            "step_seconds": times,
            "teacher_seconds": teacher_s,
            "end_epoch_seconds": end,
            "images_per_second": args.steps * b / (sum(times) + end),
        }
        if args.flops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                step(xs[0], ys[0])
            rec["flops_per_step"] = fc.get_total_flops()
            if step.teachers:
                with torch.no_grad(), FlopCounterMode(display=False) as ft:
                    [m(xs[0]) for m in step.teachers]
                rec["teacher_flops_per_step"] = ft.get_total_flops()
        out.append(rec)
        print(f"eager {mode}: {rec['images_per_second']:.1f} images/s", file=sys.stderr)
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "timings": out}
    text = json.dumps(res, indent=1)
    if args.json:
        args.json.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
