"""Derive the polynomial coefficients of src/cylsm_exp.h (run: python tools/exp_minimax.py).

exp(r) = 1 + r + r^2 q(r) on |r| <= a; q is the minimax polynomial (Remez exchange) for the
relative error of the whole, with its first coefficient fixed at a value the data type holds
(it weighs most: r^2 <= 0.12) and the others rounded to that type afterwards.  Prints the
coefficients, lowest first, as C hex literals, and the relative error with them rounded.
Needs mpmath (a dependency of sympy; not of cylsm).
"""
import mpmath as mp
import numpy as np

mp.mp.dps = 50


def remez(degree, a, c2):
    """Coefficients c3..c_degree of q (c2 given) minimising max |(1 + r + r^2 q) / e^r - 1|."""
    m = degree - 2                      # unknowns
    target = lambda r: mp.expm1(r) - r - c2 * r * r

    def err(c, r):
        q = mp.mpf(0)
        for ck in reversed(c):
            q = q * r + ck
        return (r ** 3 * q - target(r)) / mp.exp(r)

    pts = sorted(a * mp.cos(mp.pi * (i + mp.mpf(0.5)) / (m + 1)) for i in range(m + 1))
    grid = [-a + 2 * a * i / mp.mpf(4000) for i in range(4001)]
    for _ in range(40):
        A = mp.matrix(m + 1, m + 1)
        b = mp.matrix(m + 1, 1)
        for i, r in enumerate(pts):
            for k in range(m):
                A[i, k] = r ** (k + 3)
            A[i, m] = -(-1) ** i * mp.exp(r)
            b[i] = target(r)
        sol = mp.lu_solve(A, b)
        c, level = [sol[k] for k in range(m)], abs(sol[m])
        vals = [err(c, r) for r in grid]
        peaks = []                      # the largest error of each run of one sign
        for i, v in enumerate(vals):
            if ((i == 0 or abs(v) >= abs(vals[i - 1])) and (i == len(vals) - 1 or
                                                            abs(v) >= abs(vals[i + 1]))):
                if peaks and mp.sign(peaks[-1][1]) == mp.sign(v):
                    if abs(v) > abs(peaks[-1][1]):
                        peaks[-1] = (grid[i], v)
                else:
                    peaks.append((grid[i], v))
        while len(peaks) > m + 1:
            peaks.pop(0 if abs(peaks[0][1]) < abs(peaks[-1][1]) else -1)
        worst = max(abs(v) for v in vals)
        if len(peaks) == m + 1:
            pts = [r for r, _ in peaks]
        if abs(worst - level) < 1e-6 * worst:
            break
    return c


def rel_error(coeffs, a):
    worst = mp.mpf(0)
    for i in range(20001):
        r = -a + 2 * a * i / mp.mpf(20000)
        q = mp.mpf(0)
        for ck in reversed(coeffs):
            q = q * r + mp.mpf(float(ck))
        worst = max(worst, abs((1 + r + r * r * q) / mp.exp(r) - 1))
    return worst


# (the first coefficients: the type's values nearest the unconstrained optimum's)
for name, degree, a, dtype, c2, suffix in (
        ("cylsm_expm1_poly (double)", 11, "0.3470", np.float64, "0x1.000000000000ap-1", ""),
        ("cylsm_expm1f_poly (float)", 6, "0.3476", np.float32, "0x1.fffffep-2", "f")):
    a = mp.mpf(a)
    c2 = dtype(float.fromhex(c2))
    coeffs = [c2] + [dtype(float(c)) for c in remez(degree, a, mp.mpf(float(c2)))]
    e = rel_error(coeffs, a)
    print(f"{name}: degree {degree} on |r| <= {a}, relative error {mp.nstr(e, 3)} "
          f"(2^{mp.nstr(mp.log(e, 2), 3)})")
    print("  " + ", ".join(float(c).hex() + suffix for c in coeffs))
