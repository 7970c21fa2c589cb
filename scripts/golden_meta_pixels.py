"""Golden values for the agent's meta mode on segmentation: per-pixel features, weights and the
look-ahead credit through the 1x1 classifier (docs/METHOD.md section 10.7;
crates/rl-weighting/src/pixels.rs).

    $MTKD_TORCH_PYTHON scripts/golden_meta_pixels.py

Writes
  crates/rl-weighting/tests/golden/meta_pixels.json   read by crates/rl-weighting/tests/agent.rs

Written with autograd, independently of the Rust closed form: the student's segmentation head is
a real 1x1 convolution (W, b) on a head map followed by bilinear upsampling
(`F.interpolate(..., align_corners=False)`), and it takes a *real* virtual SGD step
(`torch.autograd.grad(..., create_graph=True)`) on the training loss

    ce_w * mean_b share_b * mean_{valid p} CE[b, p] + kd_w * mean_b sum_m mean_{valid p} w[b, m, p] T^2 KL_m[b, p]

(`share_b` = B / labelled images on a labelled image, 0 on the others) with the per-pixel teacher
weights w held as a leaf. The quiz loss is the pixel cross-entropy of the moved head, averaged
over each labelled image's valid pixels, then over those images; the credit is
`-d quiz / d w / lr * B n_b` at the valid pixels (0 elsewhere). For `quiz = "own"` each quiz
pixel is scored on a real virtual step of its own term of the training loss, one pixel at a time
(`own_quiz_loss`, `own_credit`). `neutral`: the same agent with `unlabelled_ce = "neutral"`
(the two `ce` features held at 0 on the unlabelled image's pixels). `per_sample`: the same agent
with `advantage = "per-sample"` (each pixel's centred credit over its own RMS). The policy (shared MLP over the
per-pixel features, learnt bias per teacher, softmax over teachers), the running normaliser, the
credit RMS, the loss and `torch.optim.Adam` follow section 10. Three batches in order; batch 0 has
pixels without a label (255) and its last image carries no label (a pseudo-labelled image).
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/rl-weighting/tests/golden/meta_pixels.json"
IGNORE = 255


def tensor(t):
    t = t.detach().double()
    return {"shape": list(t.shape), "data": t.reshape(-1).tolist()}


class Norm:
    def __init__(self, d):
        self.mean = torch.zeros(d)
        self.var = torch.ones(d)
        self.count = 0.0

    def update(self, x):
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

    def apply(self, x):
        return ((x - self.mean) / (self.var + 1e-4).sqrt()).clamp(-5.0, 5.0)


def head_logits(fmap, W, b, hw):
    z = torch.einsum("bdyx,kd->bkyx", fmap, W) + b.view(1, -1, 1, 1)
    return F.interpolate(z, size=hw, mode="bilinear", align_corners=False)


def main():
    g = torch.Generator().manual_seed(20261206)
    M, K, D, HID, NF = 3, 4, 5, 8, 6
    B, h, w, H, W_ = 3, 4, 4, 8, 8
    T, ce_w, kd_w, inner_lr, lr, tau, decay = 2.0, 1.0, 0.8, 0.1, 0.01, 0.2, 0.99

    l1 = torch.nn.Linear(NF, HID)
    l2 = torch.nn.Linear(HID, 1, bias=False)
    teacher_bias = torch.nn.Parameter(torch.zeros(M))
    with torch.no_grad():
        for scale, layer in ((0.5, l1), (0.3, l2)):
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        teacher_bias.copy_(torch.randn(M, generator=g) * 0.2)
    params = {"l1.weight": l1.weight, "l1.bias": l1.bias, "l2.weight": l2.weight,
              "teacher_bias": teacher_bias}
    init = {k: tensor(v) for k, v in params.items()}
    start = {k: v.detach().clone() for k, v in params.items()}

    def policy(x):
        return F.softmax(l2(F.relu(l1(x))).squeeze(-1) + teacher_bias, -1)

    data = []
    for i in range(3):
        fmap = torch.rand(B, D, h, w, generator=g)
        Wc = torch.randn(K, D, generator=g) * 0.5
        bc = torch.randn(K, generator=g) * 0.1
        zt = [torch.randn(B, K, H, W_, generator=g) * 2.0 for _ in range(M)]
        y = torch.randint(0, K, (B, H, W_), generator=g)
        labelled = torch.ones(B, dtype=torch.bool)
        if i == 0:
            y[0, :2, :] = IGNORE
            labelled[B - 1] = False
        data.append((fmap, Wc, bc, zt, y, labelled))

    def run(neutral, per_sample=False):
        """The agent over the three batches from the same start; `neutral`: the two `ce`
        features held at 0 (after the normaliser) on the pixels of unlabelled images
        (`unlabelled_ce = "neutral"`), without the own-quiz values; `per_sample`: each pixel's
        centred credit over its own RMS across the teachers (`advantage = "per-sample"`, what
        `"auto"` is on segmentation)."""
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(start[k])
        opt = torch.optim.Adam(list(params.values()), lr=lr, eps=1e-8)
        norm = Norm(NF)
        ms, count = 0.0, 0
        batches = []
        for fmap, Wc, bc, zt, y, labelled in data:
            batches.append(step(fmap, Wc, bc, zt, y, labelled, neutral, opt, norm, (ms, count),
                                per_sample))
            ms, count = batches[-1].pop("_ms"), batches[-1].pop("_count")
        return batches

    def step(fmap, Wc, bc, zt, y, labelled, neutral, opt, norm, rms_state, per_sample):
        ms, count = rms_state
        zs = head_logits(fmap, Wc, bc, (H, W_))
        valid = (y != IGNORE).float()
        n_b = valid.sum((1, 2)).clamp_min(1.0)
        # Per-pixel features (T = 1 CE and entropy, T^2 KL at T).
        logq = F.log_softmax(zs / T, 1)
        ce = torch.stack([F.cross_entropy(z, y, ignore_index=IGNORE, reduction="none") for z in zt], 1)
        kl = torch.stack([(F.softmax(z / T, 1) * (F.log_softmax(z / T, 1) - logq)).sum(1) * T * T for z in zt], 1)
        ent = torch.stack([-(F.softmax(z, 1) * F.log_softmax(z, 1)).sum(1) for z in zt], 1)
        feats = torch.stack([ce, kl, ent, torch.zeros_like(ce), ce - ce.mean(1, keepdim=True),
                             kl - kl.mean(1, keepdim=True)], 2)  # [B, M, F, H, W]
        rows = feats.permute(0, 3, 4, 1, 2).reshape(-1, M, NF)
        vrows = valid.reshape(-1) > 0
        norm.update(rows[vrows].reshape(-1, NF))
        x = norm.apply(rows.reshape(-1, NF)).reshape(-1, M, NF)
        if neutral:
            unl = (~labelled).float().view(B, 1).expand(B, H * W_).reshape(-1, 1, 1)
            cols = torch.zeros(1, 1, NF)
            cols[0, 0, [0, 4]] = 1.0
            x = x * (1 - unl * cols)
        wcur = policy(x).detach()
        leaf = wcur.clone().requires_grad_(True)
        wpix = leaf.reshape(B, H, W_, M).permute(0, 3, 1, 2)  # [B, M, H, W]
        # A real virtual step of the 1x1 classifier.
        Wv = Wc.clone().requires_grad_(True)
        bv = bc.clone().requires_grad_(True)
        z = head_logits(fmap, Wv, bv, (H, W_))
        share = labelled.float() * B / labelled.float().sum()
        ce_s = (F.cross_entropy(z, y, ignore_index=IGNORE, reduction="none") * valid).sum((1, 2)) / n_b
        logq_v = F.log_softmax(z / T, 1)
        kd = 0
        for m in range(M):
            p = F.softmax(zt[m] / T, 1)
            klm = (p * (F.log_softmax(zt[m] / T, 1) - logq_v)).sum(1) * T * T
            kd = kd + (wpix[:, m] * klm * valid).sum((1, 2)) / n_b
        train = (ce_w * share * ce_s + kd_w * kd).mean()
        gW, gb = torch.autograd.grad(train, [Wv, bv], create_graph=True)
        zq = head_logits(fmap, Wc - inner_lr * gW, bc - inner_lr * gb, (H, W_))
        qmask = valid * labelled.float().view(B, 1, 1)
        qn = qmask.sum((1, 2))
        per_img = (F.cross_entropy(zq, y.clamp(0, K - 1), reduction="none") * qmask).sum((1, 2)) / qn.clamp_min(1.0)
        quiz_loss = (per_img * (qn > 0).float()).sum() / (qn > 0).float().sum()
        (gw,) = torch.autograd.grad(quiz_loss, [leaf])
        scale = (B * n_b).view(B, 1, 1).expand(B, H, W_).reshape(-1, 1) * valid.reshape(-1, 1)
        credit = -gw / inner_lr * scale
        # quiz = "own": each quiz pixel scored on a real virtual step of its own term of the
        # training loss, one pixel at a time.
        own_quiz, own_credit = (None, None) if neutral else own(fmap, Wc, bc, zt, y, wcur, share, qmask, qn, n_b, scale)
        return finish(credit, x, vrows, valid, n_b, opt, ms, count, fmap, Wc, bc, zt, y, labelled,
                      quiz_loss, wcur, own_quiz, own_credit, per_sample)

    def own(fmap, Wc, bc, zt, y, wcur, share, qmask, qn, n_b, scale):
        own_leaf = wcur.clone().requires_grad_(True)
        own_w = own_leaf.reshape(B, H, W_, M).permute(0, 3, 1, 2)
        own_terms = []
        n_quiz_images = (qn > 0).float().sum()
        for bi in range(B):
            for yy in range(H):
                for xx in range(W_):
                    if qmask[bi, yy, xx] == 0:
                        continue
                    Wv = Wc.clone().requires_grad_(True)
                    bv = bc.clone().requires_grad_(True)
                    zp = head_logits(fmap, Wv, bv, (H, W_))[bi, :, yy, xx]
                    yp = y[bi, yy, xx]
                    term = ce_w * share[bi] * F.cross_entropy(zp.unsqueeze(0), yp.view(1))
                    lq = F.log_softmax(zp / T, 0)
                    for m in range(M):
                        pm = F.softmax(zt[m][bi, :, yy, xx] / T, 0)
                        klm = (pm * (F.log_softmax(zt[m][bi, :, yy, xx] / T, 0) - lq)).sum() * T * T
                        term = term + kd_w * own_w[bi, m, yy, xx] * klm
                    term = term / n_b[bi] / B
                    gWp, gbp = torch.autograd.grad(term, [Wv, bv], create_graph=True)
                    zq_p = head_logits(fmap, Wc - inner_lr * gWp, bc - inner_lr * gbp, (H, W_))[bi, :, yy, xx]
                    own_terms.append(F.cross_entropy(zq_p.unsqueeze(0), yp.view(1)) / qn[bi] / n_quiz_images)
        own_quiz = torch.stack(own_terms).sum()
        (gw_own,) = torch.autograd.grad(own_quiz, [own_leaf])
        own_credit = -gw_own / inner_lr * scale
        return own_quiz, own_credit

    def finish(credit, x, vrows, valid, n_b, opt, ms, count, fmap, Wc, bc, zt, y, labelled,
               quiz_loss, wcur, own_quiz, own_credit, per_sample):
        sel = credit[vrows]
        centred = sel - sel.mean(1, keepdim=True)
        ms = ms * decay + centred.double().square().mean().item() * (1 - decay)
        count += 1
        rms = (ms / (1 - decay ** count)) ** 0.5
        if per_sample:
            own_rms = centred.square().mean(1, keepdim=True).sqrt()
            adv = (centred / own_rms.clamp_min(rms * 1e-3)).detach()
        else:
            adv = (centred / rms).detach()
        wsel = policy(x[vrows])
        entropy = -(wsel * wsel.clamp_min(1e-12).log()).sum(1)
        pl = -(wsel * adv).sum(1).mean() - tau * entropy.mean()
        opt.zero_grad()
        pl.backward()
        opt.step()
        with torch.no_grad():
            wp = policy(x).reshape(B, H, W_, M).permute(0, 3, 1, 2)
            per_image = (wp * valid.unsqueeze(1)).sum((2, 3)) / n_b.unsqueeze(1)
        out = {
            "fmap": tensor(fmap), "weight": tensor(Wc), "bias": tensor(bc),
            "teachers": [tensor(z) for z in zt], "targets": y.reshape(-1).tolist(),
            "labelled": labelled.tolist(), "quiz_loss": quiz_loss.item(),
            "credit_weights": tensor(wcur), "credit": tensor(credit),
            "params_after": {k: tensor(v) for k, v in params.items()},
            "pixel_weights": tensor(wp), "image_weights": tensor(per_image),
            "_ms": ms, "_count": count,
        }
        if own_quiz is not None:
            out["own_quiz_loss"] = own_quiz.item()
            out["own_credit"] = tensor(own_credit)
        return out

    batches = run(False)
    neutral = run(True)
    per_sample = run(False, per_sample=True)

    out = {
        "M": M, "K": K, "hidden": HID, "dims": [B, H, W_], "temperature": T, "ce_weight": ce_w,
        "kd_weight": kd_w, "inner_lr": inner_lr, "meta_lr": lr, "entropy": tau, "init": init,
        "ignore": IGNORE, "batches": batches, "torch": torch.__version__,
        # unlabelled_ce = "neutral", quiz = "current": credit, parameters and weights per batch.
        "neutral": [{k: b[k] for k in ("credit", "params_after", "pixel_weights", "image_weights")}
                    for b in neutral],
        # advantage = "per-sample", quiz = "current": the same, per batch.
        "per_sample": [{k: b[k] for k in ("credit", "params_after", "pixel_weights",
                                          "image_weights")} for b in per_sample],
    }
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
