"""The look-ahead reference that scripts/golden_mmkd.py (MMKD, docs/METHOD.md section 8) and
scripts/golden_meta.py (the agent's meta mode, section 10) share, written with autograd,
independently of the Rust closed form: the random batches both draw, and the quiz loss after a
*real* virtual SGD step of the student's classifier (W, b),
`torch.autograd.grad(L, [W, b], create_graph=True)` with
L = mean(ce_w CE + kd_w sum_m w_m T^2 KL(p_m || q)).
"""
import torch
import torch.nn.functional as F


def tensor(t):
    return {"shape": list(t.shape), "data": [float(x) for x in t.detach().reshape(-1).tolist()]}


def random_batch(g, M, K, D, b):
    """A batch of `b` samples drawn from `g`: teacher logits `zt [M, b, K]`, the classifier's
    input `h [b, D]`, its weight `W [K, D]` and bias `[K]`, labels `y [b]`; returns them, the
    student's logits `h W' + bias`, and the batch's golden record."""
    zt = torch.randn(M, b, K, generator=g) * 2.0
    h = torch.randn(b, D, generator=g)
    W = torch.randn(K, D, generator=g) * 0.5
    bias = torch.randn(K, generator=g) * 0.1
    y = torch.randint(0, K, (b,), generator=g)
    zs = h @ W.t() + bias
    rec = {
        "teacher_logits": tensor(zt),
        "embedding": tensor(h),
        "weight": tensor(W),
        "bias": tensor(bias),
        "labels": [int(v) for v in y.tolist()],
    }
    return zt, h, W, bias, y, zs, rec


def lookahead_quiz_loss(w, zt, h, W, bias, y, quiz, T, ce_w, kd_w, inner_lr):
    """The cross-entropy on `quiz = (hq, yq)` of the classifier after a virtual SGD step at
    `inner_lr` on the batch `(h, y)` with teacher weights `w [b, M]` (differentiable in `w`)."""
    hq, yq = quiz
    b, M = w.shape
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
    return F.cross_entropy(zq, yq)


def lookahead_own_loss(w, zt, h, W, bias, y, T, ce_w, kd_w, inner_lr):
    """The own-sample quiz: each sample b is scored on the classifier after a virtual SGD step
    at `inner_lr` on its own term of the batch loss (the batch mean's 1/b share), and the loss
    is the mean of those cross-entropies (differentiable in `w [b, M]`)."""
    b, M = w.shape
    losses = []
    for i in range(b):
        Wv = W.clone().requires_grad_(True)
        bv = bias.clone().requires_grad_(True)
        z = h[i:i + 1] @ Wv.t() + bv
        logq = F.log_softmax(z / T, 1)
        kd = torch.zeros(1)
        for m in range(M):
            p = F.softmax(zt[m][i:i + 1] / T, 1)
            kd = kd + w[i, m] * (p * (torch.log(p) - logq)).sum(1) * T * T
        loss = (ce_w * F.cross_entropy(z, y[i:i + 1], reduction="none") + kd_w * kd).sum() / b
        gW, gb = torch.autograd.grad(loss, [Wv, bv], create_graph=True)
        zq = h[i:i + 1] @ (W - inner_lr * gW).t() + (bias - inner_lr * gb)
        losses.append(F.cross_entropy(zq, y[i:i + 1]))
    return torch.stack(losses).mean()
