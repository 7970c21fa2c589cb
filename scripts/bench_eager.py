"""The eager-PyTorch reference of the performance report (docs/PERF.md, `cargo xtask bench`): the
same training step as mtkd's, written as a PyTorch user writes it, with the same TorchScript
teachers, on the plan that `mtkd bench-steps` prints (student, input, classes, batch, loss weights,
teacher files).

    $MTKD_TORCH_PYTHON scripts/bench_eager.py --plan PLAN.json --modes ce,kd1,aver,mtkd-rl \
        --warmup 3 --steps 10 --json OUT.json [--flops] [--device cuda]

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
--device cuda runs everything on the GPU (torch.set_default_device; the random inputs are drawn
on the CPU with the same generator and moved), and times each step to a torch.cuda.synchronize().
--flops counts the floating-point operations of one step per mode (torch.utils.flop_counter,
2 per multiply-add; the teachers' TorchScript graphs are counted too) for the GFLOP/s figures.

Segmentation and detection (plan["task"], `DenseStep`): the student is the zoo's twin with the
plan's head (fcn, aspp, fcos; its state_dict names and shapes and its parameter count are checked
against mtkd's student, plan["student_state"]), the mtkd-trained teachers are rebuilt with their
heads from their .safetensors (names checked) and traced; the targets are random masks [B, H, W]
or random boxes [B, N, 5] (1 to plan["detection"]["max_objects"] per image). Per mode:
  ce      the task loss only: per-pixel CE averaged over each image's labelled pixels, or the FCOS
          loss (the assignment of the boxes to the locations of strides 4, 8, 16 runs in every
          step; sigmoid focal + GIoU + centerness BCE, each over the image's positives);
  kd1     + the first teacher's KD term (pixel-wise T^2 KL over labelled pixels, or CWD with
          dense_kd = "cwd"; detection: foreground-weighted binary KL of the class logits plus
          box_kd_weight x GIoU to the teacher's boxes at positive locations), weight 1;
  aver    + every teacher's KD term, weights 1/M;
  mtkd-rl the agent of plan["agent_mode"]. Clean mode (crates/rl-weighting/src/agent.rs): the
          state per teacher [cos (0 without feature KD), KD term, teacher task loss, teacher
          embedding (with feature KD), teacher logits pooled over labelled pixels / positive
          locations] normalised by running statistics, a logistic-normal policy
          u = mu + sigma * eps, weights ((softmax(u) + (1 - softmax(teacher loss)) / (M - 1) +
          softmax(KD)) / 3; the reward needs the student's task loss in eval mode before and
          after the update (two extra no-grad forwards per step), standardised over the batch;
          the buffer updates the agent (REINFORCE, one SGD step per stored batch, gradient norm
          clipped at 1) when it holds agent_buffer_steps batches and at the end of the epoch.
          Parity mode as for classification.
KD1 and AVER compute only what their loss uses; mtkd also computes every strategy's signals
(teacher task losses, entropies, pooled logits), which shows in the ratio.
"""
import argparse
import json
import math
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


def parity_agent_loss(agent, state, c, d_l, d_f, per):
    """The published agent's loss on a stored batch: reward clamp((r - mean) / std, 0, 1) of
    r = -per, the fixed mix (a + c + d) / 3 of the current policy, -r_hat log w (log clamped
    at -100) averaged, for the logit and the feature weights."""
    r = -per
    r_hat = torch.clamp((r - r.mean()) / r.std(), 0, 1)[:, None]
    a_l, a_f = agent(state)
    w_l, w_f = (a_l + c + d_l) / 3, (a_f + c + d_f) / 3
    return (-r_hat * torch.clamp(torch.log(w_l), min=-100)).mean() + \
        (-r_hat * torch.clamp(torch.log(w_f), min=-100)).mean()


class StepSetup:
    """What both steps (`Step`, `DenseStep`) set up alike."""

    def start(self, plan, mode, teachers):
        """Seed 0, the plan and mode, and the teachers the mode uses (ce none, kd1 the first)."""
        torch.manual_seed(0)
        self.plan, self.mode, self.k = plan, mode, plan["num_classes"]
        self.teachers = [] if mode == "ce" else (teachers[:1] if mode == "kd1" else teachers)

    def adapters_and_optimizer(self):
        """Once the student is built: a probe batch through it (eval mode, then train again)
        and through the teachers gives the maps' shapes; with feature KD, an adapter per
        teacher; SGD over the student and the adapters. Returns the teachers' probe outputs."""
        plan = self.plan
        c, h, w = plan["input"]
        probe = torch.zeros(2, c, h, w)
        with torch.no_grad():
            _, fs = self.student.eval()(probe)
            self.student.train()
            touts = [t(probe) for t in self.teachers]
        self.feat = plan["feature_weight"] > 0 and self.mode != "ce"
        self.adapters = nn.ModuleList(
            Adapter(fs.shape[1], o[1].shape[1], tuple(o[1].shape[2:])) for o in touts
        ) if self.feat else nn.ModuleList()
        params = list(self.student.parameters()) + list(self.adapters.parameters())
        self.opt = torch.optim.SGD(params, lr=plan["lr"], momentum=plan["momentum"],
                                   nesterov=plan["nesterov"], weight_decay=plan["weight_decay"])
        return touts


class Step(StepSetup):
    def __init__(self, plan, mode, teachers):
        self.start(plan, mode, teachers)
        c, k = plan["input"][0], self.k
        self.student = student_zoo.build(plan["student"], c, k).train()
        touts = self.adapters_and_optimizer()
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
        for entry in self.buffer:
            al = parity_agent_loss(self.agent, *entry)
            self.agent_opt.zero_grad()
            al.backward()
            self.agent_opt.step()
        self.buffer = []


# ------------------------------------------------------------------------------ dense tasks
#
# Segmentation and detection (plan["task"]): the student is the zoo's twin with its dense head
# (scripts/student_zoo.py: fcn, aspp, fcos), the teachers the mtkd-trained ones with theirs.


def masked_image_mean(per_pixel, valid):
    """Mean over each image's valid pixels `[B, H, W]` -> `[B]` (0 for an image without any)."""
    return (per_pixel * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)


def pixel_kl(s, t, temp):
    """Per-pixel T^2 KL(softmax(t/T) || softmax(s/T)) over the classes `[B, K, H, W]` -> `[B, H, W]`."""
    log_q = F.log_softmax(s / temp, 1)
    log_p = F.log_softmax(t / temp, 1)
    return (log_p.exp() * (log_p - log_q)).sum(1) * temp * temp


def cwd(s, t, temp):
    """Channel-wise distillation: per channel, T^2 KL of the spatial softmaxes, mean over channels."""
    log_q = F.log_softmax(s.flatten(2) / temp, -1)
    log_p = F.log_softmax(t.flatten(2) / temp, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean(-1) * temp * temp


def pearson(s, t):
    def norm(x):
        f = x.flatten(2)
        return (f - f.mean(-1, keepdim=True)) / (f.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    return (norm(s) - norm(t)).square().flatten(1).mean(1)


class Segmentation:
    """Per-pixel cross-entropy with an ignore label, pixel-wise KD (or CWD), per image."""

    def __init__(self, plan):
        self.ignore = plan.get("ignore_index", 255)
        self.dense_kd = plan.get("dense_kd", "kl")

    def targets(self, masks):
        return masks, (masks != self.ignore).float()

    def loss(self, logits, tg):
        masks, valid = tg
        per = F.cross_entropy(logits, masks, ignore_index=self.ignore, reduction="none")
        return masked_image_mean(per, valid)

    def kd(self, s, t, temp, tg):
        if self.dense_kd == "cwd":
            return cwd(s, t, temp)
        return masked_image_mean(pixel_kl(s, t, temp), tg[1])

    def pooled(self, logits, tg):
        """Logits averaged over each image's valid pixels `[B, K]` (what the agent's state holds)."""
        v = tg[1][:, None]
        return (logits * v).sum((2, 3)) / v.sum((2, 3)).clamp_min(1.0)

    def pixel_weighted_kd(self, s, ts, w, temp, tg):
        """distill.pixel_weights = "confidence": each teacher's per-image weight spread over the
        pixels by its per-pixel confidence (1 - softmax_m(pixel CE)) / (M - 1)."""
        masks, valid = tg
        m = len(ts)
        with torch.no_grad():
            ce = torch.stack([F.cross_entropy(t, masks, ignore_index=self.ignore, reduction="none")
                              for t in ts], 1)
            c = torch.ones_like(ce) if m == 1 else (1 - F.softmax(ce, 1)) / (m - 1)
            wc = c * w[:, :, None, None]
            pw = wc / wc.sum(1, keepdim=True).clamp_min(1e-12) * w.sum(1)[:, None, None, None]
        return sum(masked_image_mean(pixel_kl(s, t, temp) * pw[:, i], valid) for i, t in enumerate(ts))


def sigmoid_focal(logits, targets, alpha, gamma):
    """torchvision.ops.sigmoid_focal_loss, reduction none."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (targets * alpha + (1 - targets) * (1 - alpha)) * loss
    return loss


def giou_loss(a, b, eps=1e-7):
    """1 - GIoU of aligned boxes `[..., 4]` (torchvision.ops.generalized_box_iou_loss)."""
    x1, y1, x2, y2 = a.unbind(-1)
    x1g, y1g, x2g, y2g = b.unbind(-1)
    xk1, yk1 = torch.maximum(x1, x1g), torch.maximum(y1, y1g)
    xk2, yk2 = torch.minimum(x2, x2g), torch.minimum(y2, y2g)
    inter = torch.zeros_like(x1)
    ok = (xk2 > xk1) & (yk2 > yk1)
    inter = torch.where(ok, (xk2 - xk1) * (yk2 - yk1), inter)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    hull = (torch.maximum(x2, x2g) - torch.minimum(x1, x1g)) * (torch.maximum(y2, y2g) - torch.minimum(y1, y1g))
    return 1 - (iou - (hull - union) / (hull + eps))


class Detection:
    """FCOS: the assignment of the batch's boxes to the locations of strides 4, 8, 16 (centre
    sampling, size ranges), focal + GIoU + centerness loss per image, foreground-weighted class
    KD plus box KD (GIoU to the teacher's boxes at positive locations)."""

    def __init__(self, plan):
        d = plan["detection"]
        h, w = plan["input"][1:]
        self.k = plan["num_classes"]
        self.alpha, self.gamma = d["focal_alpha"], d["focal_gamma"]
        self.radius = d["center_radius"]
        self.box_kd_weight = plan.get("box_kd_weight", 1.0)
        strides, factor = d["strides"], d["size_factor"]
        rows = []
        for lvl, s in enumerate(strides):
            lh, lw = -(-h // s), -(-w // s)
            lo = -1.0 if lvl == 0 else factor * s / 2
            hi = 1e8 if lvl + 1 == len(strides) else factor * s
            ys, xs = torch.meshgrid(torch.arange(lh), torch.arange(lw), indexing="ij")
            n = lh * lw
            rows.append(torch.stack([(xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s,
                                     torch.full((n,), float(s)), torch.full((n,), lo),
                                     torch.full((n,), hi)], 1))
        self.loc = torch.cat(rows).float()  # [L, 5]: cx, cy, stride, range low, range high

    def targets(self, gt):
        """FCOS assignment of `gt [B, N, 5+]` (x1, y1, x2, y2, class; class -1 = padding)."""
        b, n = gt.shape[:2]
        cx, cy, st, lo, hi = (self.loc[None, :, i, None] for i in range(5))  # [1, L, 1]
        x1, y1, x2, y2, cls = (gt[:, None, :, i] for i in range(5))  # [B, 1, N]
        ltrb = torch.stack([cx - x1, cy - y1, x2 - cx, y2 - cy], -1)  # [B, L, N, 4]
        r = st * self.radius
        ok = (ltrb.amin(-1) > 0) & ((cx - (x1 + x2) / 2).abs() < r) & ((cy - (y1 + y2) / 2).abs() < r)
        reach = ltrb.amax(-1)
        ok = ok & (reach > lo) & (reach <= hi) & (cls >= 0)
        area = ((x2 - x1) * (y2 - y1)).expand(b, self.loc.shape[0], n)
        best, idx = torch.where(ok, area, torch.full_like(area, float("inf"))).min(-1)  # [B, L]
        pos = torch.isfinite(best)
        pick = gt.gather(1, idx[..., None].expand(-1, -1, gt.shape[2]))  # [B, L, 5+]
        classes = torch.where(pos, pick[..., 4].round().long(), torch.full_like(idx, -1))
        posf = pos.float()
        boxes = pick[..., :4] * posf[..., None]
        d = ltrb.gather(2, idx[:, :, None, None].expand(-1, -1, 1, 4)).squeeze(2).clamp_min(0)
        l, t, rr, bb = d.unbind(-1)
        ctr = (torch.minimum(l, rr) / torch.maximum(l, rr).clamp_min(1e-6)
               * torch.minimum(t, bb) / torch.maximum(t, bb).clamp_min(1e-6)).sqrt() * posf
        return classes, boxes, ctr, posf

    def boxes(self, out):
        d = out[:, self.k:self.k + 4].clamp_min(0) * self.loc[:, 2]
        cx, cy = self.loc[:, 0], self.loc[:, 1]
        return torch.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], -1)  # [B, L, 4]

    def loss(self, out, tg):
        classes, boxes, ctr_t, pos = tg
        k = self.k
        npos = pos.sum(1).clamp_min(1.0)
        onehot = F.one_hot(classes.clamp_min(0), k).float() * pos[..., None]
        cls = sigmoid_focal(out[:, :k].transpose(1, 2), onehot, self.alpha, self.gamma).sum((1, 2)) / npos
        gl = giou_loss(self.boxes(out), boxes)
        bx = torch.where(pos >= 0.5, gl, torch.zeros_like(gl)).sum(1) / npos
        ctr = (F.binary_cross_entropy_with_logits(out[:, k + 4], ctr_t, reduction="none") * pos).sum(1) / npos
        return cls + bx + ctr

    def kd(self, s, t, temp, tg):
        pos, k = tg[3], self.k
        ss, tt = s[:, :k] / temp, t[:, :k] / temp
        pt = torch.sigmoid(tt)
        kl = pt * (F.logsigmoid(tt) - F.logsigmoid(ss)) + (1 - pt) * (F.logsigmoid(-tt) - F.logsigmoid(-ss))
        per_loc = kl.sum(1) * temp * temp  # [B, L]
        w = torch.maximum(torch.sigmoid(t[:, :k]).amax(1), pos)
        class_kd = (per_loc * w).sum(1) / w.sum(1).clamp_min(1e-6)
        if self.box_kd_weight <= 0:
            return class_kd
        gl = giou_loss(self.boxes(s), self.boxes(t))
        box_kd = torch.where(pos >= 0.5, gl, torch.zeros_like(gl)).sum(1) / pos.sum(1).clamp_min(1.0)
        return class_kd + self.box_kd_weight * box_kd

    def pooled(self, out, tg):
        """Class logits averaged over each image's positive locations (all without any) `[B, K]`."""
        pos = tg[3]
        w = torch.where(pos.sum(1, keepdim=True) > 0, pos, torch.ones_like(pos))[:, None]
        return (out[:, :self.k] * w).sum(2) / w.sum(2).clamp_min(1.0)


class RunningNorm:
    """The clean agent's state normaliser: running mean and (biased) variance, clipped output."""

    def __init__(self, d):
        self.mean, self.var, self.count = torch.zeros(d), torch.ones(d), 0.0

    def __call__(self, x):
        b = x.shape[0]
        bm, bv = x.mean(0), x.var(0, unbiased=False)
        total = self.count + b
        delta = bm - self.mean
        m2 = self.var * self.count + bv * b + delta.square() * (self.count * b / total)
        self.mean = self.mean + delta * (b / total)
        self.var = m2 / total
        self.count = total
        return ((x - self.mean) / (self.var + 1e-4).sqrt()).clamp(-5, 5)


class DenseStep(StepSetup):
    """The training step of a segmentation or detection setting (module docstring)."""

    def __init__(self, plan, mode, teachers):
        self.start(plan, mode, teachers)
        c, k = plan["input"][0], self.k
        self.task = Segmentation(plan) if plan["task"] == "segmentation" else Detection(plan)
        self.student = student_zoo.build(plan["student"], c, k, plan["student_head"])
        check_student(self.student, plan)
        self.student.train()
        touts = self.adapters_and_optimizer()
        self.pixel_weights = plan.get("pixel_weights", "image") == "confidence"
        self.feature_loss = plan.get("feature_loss", "mse")
        self.agent, self.buffer, self.epoch = None, [], 1
        m = len(self.teachers)
        if mode == "mtkd-rl":
            self.agent_mode = plan["agent_mode"]
            if self.agent_mode not in ("clean", "parity"):
                raise SystemExit(f"bench_eager: agent mode {self.agent_mode} has no dense reference")
            d = sum((o[1].shape[1] if self.feat else 0) + k + 3 for o in touts)
            self.agent = Agent(d, plan["agent_hidden"], m)
            self.agent_opt = torch.optim.SGD(self.agent.parameters(), lr=plan["agent_lr"])
            self.norm = RunningNorm(d)
            self.sigma = plan.get("agent_sigma", 0.5)
            self.noise = torch.Generator().manual_seed(0)

    def clean_active(self):
        return (self.agent is not None and self.agent_mode == "clean" and len(self.teachers) > 1
                and self.epoch >= self.plan.get("agent_warmup_epochs", 1))

    def eval_loss(self, x, tg):
        """The task loss of the student in eval mode (the clean agent's reward, before and after)."""
        with torch.no_grad():
            self.student.eval()
            out, _ = self.student(x)
            self.student.train()
            return self.task.loss(out, tg)

    def __call__(self, x, y):
        p, temp = self.plan, self.plan["temperature"]
        tg = self.task.targets(y)
        logits, fs = self.student(x)
        ce = self.task.loss(logits, tg)
        if not self.teachers:
            loss = ce.mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            return loss.item()
        with torch.no_grad():
            touts = [m(x) for m in self.teachers]
        m = len(touts)
        kls = torch.stack([self.task.kd(logits, zt, temp, tg) for zt, _ in touts], 1)
        mses, coss, embs = [], [], []
        if self.feat:
            for i, (_, ft) in enumerate(touts):
                proj = self.adapters[i](fs)
                mses.append({"mse": lambda a, b: (a - b).square().flatten(1).mean(1),
                             "cwd": lambda a, b: cwd(a, b, temp), "pearson": pearson}[self.feature_loss](proj, ft))
                e = F.adaptive_avg_pool2d(ft, 1).flatten(1)
                coss.append(F.cosine_similarity(F.adaptive_avg_pool2d(proj, 1).flatten(1).detach(), e, 1))
                embs.append(e)
        stored = None
        if self.mode == "kd1" or m == 1:
            w_l = w_f = torch.ones_like(kls)
        elif self.mode == "aver":
            w_l = w_f = torch.full_like(kls, 1.0 / m)
        elif self.agent_mode == "clean" and not self.clean_active():
            w_l = w_f = torch.full_like(kls, 1.0 / m)
        else:
            with torch.no_grad():
                kl = kls.detach()
                ce_t = torch.stack([self.task.loss(zt, tg) for zt, _ in touts], 1)
                cos = torch.stack(coss, 1) if coss else torch.zeros_like(kl)
                parts = []
                for i in range(m):
                    parts += [cos[:, i:i + 1], kl[:, i:i + 1], ce_t[:, i:i + 1]]
                    parts += [embs[i]] if embs else []
                    parts.append(self.task.pooled(touts[i][0], tg))
                state = torch.cat(parts, 1)
                c = (1 - F.softmax(ce_t, 1)) / (m - 1)
                if self.agent_mode == "clean":
                    state = self.norm(state)
                    h = F.relu(self.agent.stem(state))
                    mu_l, mu_f = self.agent.logit_head(h), self.agent.feature_head(h)
                    u_l = mu_l + torch.randn(mu_l.shape, generator=self.noise, device="cpu").to(mu_l.device) * self.sigma
                    u_f = mu_f + torch.randn(mu_f.shape, generator=self.noise, device="cpu").to(mu_f.device) * self.sigma
                    a_l, a_f = F.softmax(u_l, 1), F.softmax(u_f, 1)
                    stored = (state, u_l, u_f)
                else:
                    a_l, a_f = self.agent(state)
                w_l = (a_l + c + F.softmax(kl, 1)) / 3
                w_f = (a_f + c + F.softmax(cos, 1)) / 3
                if self.agent_mode == "parity":
                    stored = (state, c, F.softmax(kl, 1), F.softmax(cos, 1))
        if self.pixel_weights:
            kd = self.task.pixel_weighted_kd(logits, [zt for zt, _ in touts], w_l, temp, tg)
        else:
            kd = (w_l * kls).sum(1)
        per = p["ce_weight"] * ce + p["kd_weight"] * kd
        if self.feat:
            per = per + p["feature_weight"] * (w_f * torch.stack(mses, 1)).sum(1)
        loss = per.mean()
        clean = stored is not None and self.agent_mode == "clean"
        before = self.eval_loss(x, tg) if clean else None
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if clean:
            r = before - self.eval_loss(x, tg)
            signal = (r - r.mean()) / r.std()
            if r.shape[0] >= 2 and bool(torch.isfinite(signal).all()):
                self.buffer.append(stored + (signal,))
            if len(self.buffer) >= self.plan["agent_buffer_steps"]:
                self.update()
        elif stored is not None:
            self.buffer.append(stored + (per.detach(),))
            if len(self.buffer) >= self.plan["agent_step"]:
                self.update()
        return loss.item()

    def update(self):
        """One SGD step of the agent per stored batch: REINFORCE of the logistic-normal policy
        (clean, gradient norm clipped at 1) or the published loss (parity)."""
        for entry in self.buffer:
            if self.agent_mode == "clean":
                state, u_l, u_f, signal = entry
                h = F.relu(self.agent.stem(state))
                mu_l, mu_f = self.agent.logit_head(h), self.agent.feature_head(h)
                logp = -0.5 * (((u_l - mu_l) / self.sigma).square().sum(1)
                               + ((u_f - mu_f) / self.sigma).square().sum(1))
                al = -(signal * logp).mean()
            else:
                al = parity_agent_loss(self.agent, *entry)
            self.agent_opt.zero_grad()
            al.backward()
            if self.agent_mode == "clean":
                nn.utils.clip_grad_norm_(self.agent.parameters(), 1.0)
            self.agent_opt.step()
            if not math.isfinite(al.item()):
                raise SystemExit("bench_eager: the agent's loss is not finite")
        self.buffer = []

    def end_epoch(self):
        if self.agent is not None and self.buffer:
            self.update()
        self.epoch += 1


def check_student(model, plan):
    """The twin's state_dict names and shapes and its trainable parameter count against mtkd's
    student (the plan's `student_state`, `student_parameters`)."""
    want = {n: list(s) for n, s in plan.get("student_state") or []}
    if not want:
        return
    got = {n: list(t.shape) for n, t in model.state_dict().items() if not n.endswith("num_batches_tracked")}
    if got != want:
        names = sorted(set(got) ^ set(want))[:4] or [n for n in got if got[n] != want[n]][:4]
        raise SystemExit(f"bench_eager: the student twin differs from mtkd's student at {names}")
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if count != plan.get("student_parameters", count):
        raise SystemExit(f"bench_eager: student twin has {count} parameters, mtkd's {plan['student_parameters']}")


def dense_targets(plan, n, g):
    """Random targets of the plan's task: masks `[B, H, W]` or boxes `[B, N, 5]` (1 to N objects
    per image of 8 to 40 pixels, class -1 = padding)."""
    b, k = plan["batch_size"], plan["num_classes"]
    _, h, w = plan["input"]
    if plan["task"] == "segmentation":
        return [torch.randint(0, k, (b, h, w), generator=g) for _ in range(n)]
    most = max(1, plan["detection"].get("max_objects", 3))
    out = []
    for _ in range(n):
        gt = torch.full((b, most, 5), -1.0)
        for i in range(b):
            j = int(torch.randint(1, most + 1, (1,), generator=g))
            wh = 8 + torch.rand(j, 2, generator=g) * 32
            xy = torch.rand(j, 2, generator=g) * (torch.tensor([w, h]) - wh)
            gt[i, :j, :2], gt[i, :j, 2:4] = xy, xy + wh
            gt[i, :j, 4] = torch.randint(0, k, (j,), generator=g).float()
        out.append(gt)
    return out


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


class InPrecision(nn.Module):
    """A teacher computing in another float type (the plan's `teacher_precision`, as mtkd's
    `distill.teacher_precision`): its weights cast to it, the batch cast on the way in, the
    outputs back to float32."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, x):
        out = self.model(x.to(self.dtype))
        if isinstance(out, tuple):
            return tuple(t.float() for t in out)
        return out.float()


def native_teacher(arch, weights, shape, num_classes, head="classifier", dtype=torch.float32):
    """A teacher trained by mtkd, rebuilt as its PyTorch twin (scripts/student_zoo.py, the same
    parameter names, its head) with its weights, in eval mode, in `dtype`; run through
    TorchScript like a user's."""
    model = student_zoo.build(arch, shape[0], num_classes, head or "classifier")
    state = read_safetensors(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"bench_eager: {weights} does not fit {arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    if dtype != torch.float32:
        model = InPrecision(model, dtype).eval()
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.set_default_device(dev)

    def now():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    plan = json.loads(args.plan.read_text())
    plan = plan.get("plan", plan)
    if args.threads:
        torch.set_num_threads(args.threads)
    c, h, w = plan["input"]
    teachers = []
    natives = plan.get("native_teachers") or [None] * len(plan["teachers"])
    heads = plan.get("native_teacher_heads") or [None] * len(plan["teachers"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[plan.get("teacher_precision", "fp32")]
    for f, native, head in zip(plan["teachers"], natives, heads):
        if f is not None:
            t = torch.jit.load(f, map_location=dev).eval()
            if dtype != torch.float32:
                with torch.no_grad():
                    t = torch.jit.trace(InPrecision(t, dtype).eval(), torch.zeros(2, c, h, w))
            teachers.append(t)
        elif native is not None:
            teachers.append(native_teacher(native[0], native[1], (c, h, w), plan["num_classes"], head, dtype))
        else:
            raise SystemExit("bench_eager: a teacher of the plan is neither TorchScript nor trained by mtkd")
    b = plan["batch_size"]
    g = torch.Generator().manual_seed(0)
    n = args.warmup + args.steps
    dense = plan.get("task", "classification") != "classification"
    with torch.device("cpu"):
        xs = [torch.randn(b, c, h, w, generator=g) for _ in range(n)]
        if dense:
            ys = dense_targets(plan, n, g)
        else:
            ys = [torch.randint(0, plan["num_classes"], (b,), generator=g) for _ in range(n)]
    xs = [x.to(dev) for x in xs]
    ys = [y.to(dev) for y in ys]
    out = []
    for mode in args.modes.split(","):
        step = (DenseStep if dense else Step)(plan, mode, teachers)
        for i in range(args.warmup):
            step(xs[i], ys[i])
        step.end_epoch()
        times, teacher_s = [], 0.0
        for i in range(args.warmup, n):
            t0 = now()
            step(xs[i], ys[i])
            times.append(now() - t0)
        t0 = now()
        step.end_epoch()
        end = now() - t0
        # The teachers' share, timed apart (the same forwards, after the steps).
        if step.teachers:
            with torch.no_grad():
                t0 = now()
                for i in range(args.warmup, n):
                    [m(xs[i]) for m in step.teachers]
                teacher_s = now() - t0
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
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(dev), "timings": out}
    text = json.dumps(res, indent=1)
    if args.json:
        args.json.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
