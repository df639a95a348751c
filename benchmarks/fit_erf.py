"""Fit the rational erf approximation used by the BSR kernels' GELU epilogue.

erf(x) ~ x * P(x^2) / Q(x^2) on 0 < x <= 4 (Q[0] = 1), by linearised least squares
(P(z) - f Q(z) = f with f = erf(x)/x), reweighted by 1/|Q| and, Lawson style, by the current error
so the fit moves towards minimax. Prints the coefficients and the max error in float64 and in
float32 Horner evaluation, the form the kernel computes. Pure numpy + math.erf.

Usage: python benchmarks/fit_erf.py [--p 7] [--q 6]
"""

from __future__ import annotations

import argparse
import math

import numpy as np


def fit(n_p: int, n_q: int, points: int = 20001, iters: int = 60) -> tuple[np.ndarray, np.ndarray, float]:
    erf = np.vectorize(math.erf)
    xs = np.linspace(1e-4, 4.0, points)
    z, f = xs ** 2, erf(xs) / xs
    w_q, w_err = np.ones_like(z), np.ones_like(z)
    for _ in range(iters):
        a = np.concatenate([np.vander(z, n_p, increasing=True),
                            -f[:, None] * np.vander(z, n_q, increasing=True)[:, 1:]], axis=1)
        w = (w_q * w_err)[:, None]
        c, *_ = np.linalg.lstsq(a * w, f * w[:, 0], rcond=None)
        p, q = c[:n_p], np.concatenate([[1.0], c[n_p:]])
        qz = np.polyval(q[::-1], z)
        w_q = 1 / np.abs(qz)
        err = np.abs(xs * np.polyval(p[::-1], z) / qz - erf(xs))
        w_err = w_err * (err / err.max()) ** 0.3 + 1e-12
        w_err /= w_err.mean()
    return p, q, float(err.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--p", type=int, default=7, help="coefficients of P")
    ap.add_argument("--q", type=int, default=6, help="coefficients of Q (Q[0] = 1)")
    args = ap.parse_args()
    p, q, err64 = fit(args.p, args.q)
    from blockprune.backends.tvm.kernels.bsr_kernel import erf_approx_np  # noqa: F401 - shows the kernel's form

    x = np.linspace(-4, 4, 200001).astype(np.float32)
    z = x * x
    pz, qz = np.float32(0), np.float32(0)
    for c in p[::-1].astype(np.float32):
        pz = pz * z + c
    for c in q[::-1].astype(np.float32):
        qz = qz * z + c
    err32 = np.abs(x * pz / qz - np.vectorize(math.erf)(x.astype(np.float64))).max()
    print(f"max error float64 {err64:.3g}, float32 Horner {err32:.3g}")
    print("ERF_P =", tuple(p.tolist()))
    print("ERF_Q =", tuple(q.tolist()))


if __name__ == "__main__":
    main()
