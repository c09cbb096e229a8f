"""Detection efficiency: binned fractions with Wilson intervals and a sigmoid's 50% point."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.stats import binom_conf_interval
from scipy.optimize import minimize
from scipy.special import expit

ONE_SIGMA = 0.682689492  # the confidence of a Gaussian's +-1 sigma


def efficiency_curve(values: np.ndarray, found: np.ndarray, bins: np.ndarray) -> pd.DataFrame:
    """Per bin: centre, n, found, efficiency and its Wilson 68% interval."""
    values = np.asarray(values, float)
    found = np.asarray(found, bool)
    which = np.digitize(values, bins) - 1
    rows = []
    for i in range(len(bins) - 1):
        sel = which == i
        n, k = int(sel.sum()), int(found[sel].sum())
        lo, hi = binom_conf_interval(k, n, ONE_SIGMA, interval="wilson") if n else (np.nan, np.nan)
        rows.append({"lo": bins[i], "hi": bins[i + 1], "centre": 0.5 * (bins[i] + bins[i + 1]), "n": n,
                     "found": k, "efficiency": k / n if n else np.nan, "err_lo": lo, "err_hi": hi})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class SigmoidFit:
    """eff(s) = top / (1 + exp(-(s - x50) / width)); x50 is where eff = top / 2."""

    x50: float
    x50_err: float
    width: float
    top: float


def fit_sigmoid(values: np.ndarray, found: np.ndarray, decreasing: bool = False) -> SigmoidFit:
    """Unbinned binomial maximum-likelihood fit; use ``decreasing`` for magnitudes."""
    v = np.asarray(values, float)
    f = np.asarray(found, bool)
    ok = np.isfinite(v)
    v, f = v[ok], f[ok]
    sign = -1.0 if decreasing else 1.0

    def nll(p):
        x50, logw, top_logit = p
        top = 1 / (1 + np.exp(-top_logit))
        e = top * expit(sign * (v - x50) / np.exp(logw))
        e = np.clip(e, 1e-9, 1 - 1e-9)
        return -np.sum(np.where(f, np.log(e), np.log(1 - e)))

    start = [float(np.median(v)), np.log(max(np.std(v) / 5, 1e-3)), 4.0]
    res = minimize(nll, start, method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-8, "maxiter": 5000})
    x50, logw, tl = res.x
    # uncertainty of x50 from the curvature of the profile likelihood
    h = 1e-3 * max(abs(x50), 1.0)
    curv = (nll([x50 + h, logw, tl]) - 2 * res.fun + nll([x50 - h, logw, tl])) / h**2
    err = float(1 / np.sqrt(curv)) if curv > 0 else float("nan")
    return SigmoidFit(float(x50), err, float(np.exp(logw)), float(1 / (1 + np.exp(-tl))))
