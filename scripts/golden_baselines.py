"""Golden values for the baseline weighting strategies (docs/METHOD.md section 8): EBKD, CA-MKD, AEKD.

    $MTKD_TORCH_PYTHON scripts/golden_baselines.py

Writes
  crates/distill-core/tests/golden/baselines.json   read by crates/distill-core/tests/baselines.rs

Every input is drawn from a seeded torch generator and stored in the file; the Rust side rebuilds
the signals from the stored logits and recomputes the weights.

AEKD's lambda (minimum of lambda' G lambda over {0 <= lambda <= cap, sum lambda = 1}) is solved
here by an exact active-set enumeration in float64 (every split of the teachers into "at 0",
"at cap" and "free", the free part from the KKT linear system), independently of the Rust
solver (accelerated projected gradient). The chosen point is checked against the KKT conditions
and against a long plain projected-gradient run; the script stops if either check fails.
"""
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
KKT_TOL = 1e-10


def flat(t):
    return [float(x) for x in t.detach().reshape(-1).tolist()]


# ---------------------------------------------------------------------------------------------
# Strategies, written from docs/METHOD.md sections 2, 3 and 8 with plain torch calls.


def ebkd(zt):
    """zt [M, B, K] -> [B, M]: w = 1 - H_m / sum_j H_j, H = entropy of softmax(z_m) at T = 1."""
    M = zt.shape[0]
    h = torch.stack([-(F.softmax(z, 1) * F.log_softmax(z, 1)).sum(1) for z in zt], 1)
    if M == 1:
        return torch.ones_like(h)
    return 1 - h / h.sum(1, keepdim=True)


def ca_mkd(zt, y):
    """zt [M, B, K], y [B] -> [B, M]: c = (1 - softmax_m(CE)) / (M - 1)."""
    M = zt.shape[0]
    ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in zt], 1)
    if M == 1:
        return torch.ones_like(ce)
    return (1 - F.softmax(ce, 1)) / (M - 1)


def aekd_vectors(zs, zt, T):
    """g_m = T (q - p_m) averaged over the batch, in float64 -> [M, K]."""
    q = F.softmax(zs.double() / T, 1)
    return torch.stack([(T * (q - F.softmax(z.double() / T, 1))).mean(0) for z in zt])


def objective(G, x):
    return float(x @ G @ x)


def solve_active_sets(G, cap):
    """Exact minimiser of x'Gx on the capped simplex by enumerating active sets (small M)."""
    M = G.shape[0]
    best = None
    for assign in itertools.product((0, 1, 2), repeat=M):  # 0: at zero, 1: at cap, 2: free
        upper = [i for i in range(M) if assign[i] == 1]
        free = [i for i in range(M) if assign[i] == 2]
        x = torch.zeros(M, dtype=torch.float64)
        for i in upper:
            x[i] = cap
        rest = 1.0 - cap * len(upper)
        if free:
            n = len(free)
            A = torch.zeros(n + 1, n + 1, dtype=torch.float64)
            b = torch.zeros(n + 1, dtype=torch.float64)
            A[:n, :n] = G[free][:, free]
            A[:n, n] = -1.0
            A[n, :n] = 1.0
            if upper:
                b[:n] = -cap * G[free][:, upper].sum(1)
            b[n] = rest
            if abs(float(torch.linalg.det(A))) < 1e-14:
                continue
            sol = torch.linalg.solve(A, b)
            x[free] = sol[:n]
        elif abs(rest) > 1e-12:
            continue
        if (x < -1e-12).any() or (x > cap + 1e-12).any() or abs(float(x.sum()) - 1) > 1e-12:
            continue
        f = objective(G, x)
        if best is None or f < best[0] - 1e-15:
            best = (f, x)
    assert best is not None, "no feasible active set"
    return best[1]


def check_kkt(G, x, cap):
    """KKT of min x'Gx, 0 <= x <= cap, sum x = 1 (gradient 2 G x, common multiplier nu)."""
    grad = 2 * G @ x
    free = [i for i in range(len(x)) if KKT_TOL < x[i] < cap - KKT_TOL]
    scale = 1.0 + float(grad.abs().max())
    nu = float(grad[free].mean()) if free else None
    if nu is None:
        # Every coordinate sits at a bound: nu lies between the largest "at cap" gradient and the
        # smallest "at zero" gradient.
        at_cap = [float(grad[i]) for i in range(len(x)) if x[i] >= cap - KKT_TOL]
        at_zero = [float(grad[i]) for i in range(len(x)) if x[i] <= KKT_TOL]
        lo = max(at_cap) if at_cap else -float("inf")
        hi = min(at_zero) if at_zero else float("inf")
        assert lo <= hi + KKT_TOL * scale, f"KKT: no multiplier between {lo} and {hi}"
        return
    for i in range(len(x)):
        r = float(grad[i]) - nu
        if i in free:
            assert abs(r) < 1e-9 * scale, f"KKT stationarity fails at free {i}: {r}"
        elif x[i] <= KKT_TOL:
            assert r > -1e-9 * scale, f"KKT sign fails at zero {i}: {r}"
        else:
            assert r < 1e-9 * scale, f"KKT sign fails at cap {i}: {r}"


def project_capped_simplex(y, cap):
    """Euclidean projection onto {0 <= x <= cap, sum x = 1} (bisection on the shift), floats."""
    lo, hi = min(y) - cap, max(y)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if sum(min(max(v - mid, 0.0), cap) for v in y) > 1:
            lo = mid
        else:
            hi = mid
    tau = 0.5 * (lo + hi)
    return [min(max(v - tau, 0.0), cap) for v in y]


def solve_long_pgd(G, cap, iters=50_000):
    """Plain projected gradient, step 1 / lambda_max(G), in Python floats (a cross-check)."""
    M = G.shape[0]
    L = float(torch.linalg.eigvalsh(G).max())
    g = G.tolist()
    x = [1.0 / M] * M
    for _ in range(iters):
        gx = [sum(g[i][j] * x[j] for j in range(M)) for i in range(M)]
        x = project_capped_simplex([x[i] - gx[i] / L for i in range(M)], cap)
    return torch.tensor(x, dtype=torch.float64)


def aekd(zs, zt, T, cap):
    g = aekd_vectors(zs, zt, T)
    G = g @ g.T
    lam = solve_active_sets(G, cap)
    check_kkt(G, lam, cap)
    pgd = solve_long_pgd(G, cap)
    assert (pgd - lam).abs().max() < 1e-7, f"PGD {pgd.tolist()} vs active sets {lam.tolist()}"
    eig = torch.linalg.eigvalsh(G)
    return g, G, lam, eig


# ---------------------------------------------------------------------------------------------


def case(name, seed, B, M, K, T, cap, scale=3.0, near=None, student_mid=False):
    """`near` = (i, j, eps, s): teacher j = teacher i + eps noise, teacher s = student + 0.3 noise.
    `student_mid`: the student's logits are the teachers' mean (AEKD's optimum is then inside)."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(B, K, generator=g) * scale
    zt = torch.randn(M, B, K, generator=g) * scale
    y = torch.randint(0, K, (B,), generator=g)
    if near is not None:
        i, j, eps, s = near
        zt[j] = zt[i] + eps * torch.randn(B, K, generator=g)
        zt[s] = zs + 0.3 * torch.randn(B, K, generator=g)
    if student_mid:
        zs = zt.mean(0)
    w_eb = ebkd(zt)
    w_ca = ca_mkd(zt, y)
    gvec, G, lam, eig = aekd(zs, zt, T, cap)
    binds = bool((lam > cap - 1e-9).any())
    assert binds or name == "aekd interior", f"{name}: the cap should bind"
    assert not binds or name != "aekd interior", f"{name}: the cap should not bind"
    print(f"{name}: aekd lambda = {[round(v, 6) for v in lam.tolist()]} (cap {cap}, binds {binds}),"
          f" eig(G) = {[f'{v:.3e}' for v in eig.tolist()]}")
    return {
        "name": name,
        "temperature": T,
        "cap": cap,
        "student_logits": {"shape": [B, K], "data": flat(zs)},
        "teacher_logits": [{"shape": [B, K], "data": flat(z)} for z in zt],
        "labels": [int(v) for v in y.tolist()],
        "expected": {
            "ebkd": flat(w_eb),
            "ca_mkd": flat(w_ca),
            "aekd_vectors": [flat(v) for v in gvec],
            "aekd_gram": [flat(r) for r in G],
            "aekd_lambda": flat(lam),
            "aekd_cap_binds": binds,
        },
    }


def main():
    torch.set_default_dtype(torch.float32)
    out = {
        "torch_version": torch.__version__,
        "cases": [
            case("three teachers", 21, 6, 3, 7, 4.0, 0.6),
            case("two teachers", 22, 6, 2, 7, 4.0, 0.6),
            case("aekd cap binds", 23, 6, 3, 7, 4.0, 0.6, near=(0, 1, 0.5, 2)),
            case("aekd interior", 24, 6, 3, 7, 4.0, 0.6, student_mid=True),
        ],
    }
    path = ROOT / "crates/distill-core/tests/golden/baselines.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
