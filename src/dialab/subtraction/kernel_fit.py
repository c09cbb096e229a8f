"""Fitting the PSF-matching kernel: candidates, per-stamp fits, the spatial model, rejection.

The model for a stamp is  target ~ sum_j a_j(x, y) (B_j * image) + background(x, y),  with
a_0 (the kernel sum) constant over the image, the other a_j Chebyshev polynomials of the
stamp position and the differential background a Chebyshev polynomial of the pixel position.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import InsufficientKernelSourcesError
from ..imageops import Chebyshev2D, window_any
from ..stars import find_stars, stellar_locus
from .basis import KernelBasis
from .kernel import SpatialKernel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelFit:
    """A fitted kernel and background, with the bookkeeping of the candidate stamps."""

    kernel: SpatialKernel
    background: Chebyshev2D
    background_coeffs: np.ndarray
    n_candidates: int
    n_used: int
    n_rejected: int
    residual_mean: float
    residual_rms: float
    positions: np.ndarray  # (n_used, 2) x, y of the stamps kept
    free_sum: float = float("nan")  # the sum a free least-squares fit gave (equal to the sum unless it was held)

    def background_image(self, shape: tuple[int, int]) -> np.ndarray:
        return self.background.evaluate(self.background_coeffs, shape)


@dataclass
class _Stamp:
    """A kernel stamp reduced to the sums a least-squares fit needs.

    With A the stamp's columns [basis-convolved image (n), background terms (m)], weights w and
    target t: G = A^T W A, h = A^T W t, u = A^T sqrt(w), v = sum sqrt(w) t, tt = t^T W t. Any model
    that is a linear map of these columns is fitted, and its residuals summarised, from them alone.
    """

    x: float
    y: float
    G: np.ndarray
    h: np.ndarray
    u: np.ndarray
    v: float
    tt: float
    npix: int

    def residual_stats(self, c: np.ndarray) -> tuple[float, float]:
        """Mean and rms of sqrt(w) (t - A c) for column coefficients c (zero-padded to A's width)."""
        q = len(c)
        mean = (self.v - self.u[:q] @ c) / self.npix
        chi2 = self.tt - 2 * c @ self.h[:q] + c @ self.G[:q, :q] @ c
        return float(mean), float(np.sqrt(max(chi2, 0.0) / self.npix))


#: Least S/N of a kernel candidate's counterpart in the template.
MIN_COUNTERPART_SNR = 5.0


def counterpart_snr(exp, xs: np.ndarray, ys: np.ndarray, sigma_pix: float) -> np.ndarray:
    """S/N of the flux within 2 sigma of each integer (x, y), less the median of an annulus at 4-6 sigma."""
    r_in, r_out = max(2.0 * sigma_pix, 1.5), max(6.0 * sigma_pix, 5.0)
    h = int(np.ceil(r_out))
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    r = np.hypot(xx, yy)
    core, ring = r <= r_in, (r >= 4.0 * sigma_pix) & (r <= r_out)
    ny, nx = exp.shape
    out = np.zeros(len(xs))
    for i, (x, y) in enumerate(zip(xs, ys)):
        if h <= x < nx - h and h <= y < ny - h:
            cut = exp.image[y - h : y + h + 1, x - h : x + h + 1]
            var = exp.variance[y - h : y + h + 1, x - h : x + h + 1]
            flux = cut[core].sum() - core.sum() * np.median(cut[ring])
            out[i] = flux / np.sqrt(max(var[core].sum(), 1e-30))
    return out


def select_kernel_candidates(science, template, half_stamp: int, snr_range=(10.0, 500.0),
                             max_candidates: int = 1000, sigma_pix: float = 2.0) -> np.ndarray:
    """(n, 2) integer x, y of point sources in the science image usable as kernel stamps.

    Sources with S/N in ``snr_range``, away from the border, with a counterpart in the template (S/N >= 5),
    no BAD/SAT/EDGE/NO_DATA pixel of either image inside the stamp and no injected fake within 5 PSF sigma;
    isolated ones preferred, brightest first; when more qualify than ``max_candidates``, they are spread over
    the image (the brightest of each cell of a grid first), as the spatial model needs coverage, not numbers.
    """
    stars = find_stars(science, sigma_pix, snr_range[0], radius_pix=max(5, int(math.ceil(3 * sigma_pix))),
                       max_candidates=max(STARS_MEASURED, int(1.5 * max_candidates)))
    keep = stars.snr <= snr_range[1]
    stars = stars.select(keep)
    if len(stars) == 0:
        return np.zeros((0, 2), int)
    bad = science.plane("BAD", "SAT", "EDGE", "NO_DATA") | template.plane("BAD", "SAT", "EDGE", "NO_DATA")
    # injected fakes differ between the images by design: no candidate with one on its core
    injected = science.plane("INJECTED", "INJECTED_TEMPLATE") | template.plane("INJECTED", "INJECTED_TEMPLATE")
    ny, nx = bad.shape
    ix = np.round(stars.x).astype(int)
    iy = np.round(stars.y).astype(int)
    inside = (ix >= half_stamp) & (iy >= half_stamp) & (ix < nx - half_stamp) & (iy < ny - half_stamp)
    ok = inside.copy()
    ok[inside] &= ~window_any(bad, ix[inside], iy[inside], half_stamp)
    # a source the template lacks (a transient, a fake, a cosmic ray) cannot teach the kernel anything
    ok[ok] &= counterpart_snr(template, ix[ok], iy[ok], sigma_pix) >= MIN_COUNTERPART_SNR
    if injected.any():  # a fake differs between the images by design: none near a candidate's core, and
        # none within 5 sigma while 10 candidates remain (on a small image, the rejection loop handles the rest)
        ok[ok] &= ~window_any(injected, ix[ok], iy[ok], int(np.ceil(2 * sigma_pix)))
        clear = ok.copy()
        clear[ok] &= ~window_any(injected, ix[ok], iy[ok], int(np.ceil(5 * sigma_pix)))
        if clear.sum() >= 10:
            ok = clear
    if (ok & stars.isolated).sum() >= 10:
        ok &= stars.isolated
    if ok.sum() >= 10:
        # any compact source can carry the kernel (not only stars): only the clearly extended are left out
        ok[ok] &= stellar_locus(stars.sigma[ok], stars.x[ok], stars.y[ok], width=0.3, upper_sigmas=10.0)
    idx = np.nonzero(ok)[0]
    if len(idx) > max_candidates:
        idx = idx[spread_over_cells(ix[idx], iy[idx], (ny, nx), max_candidates)]
    return np.column_stack([ix[idx], iy[idx]])


#: Sources measured when looking for kernel candidates (the best of them are kept).
STARS_MEASURED = 1500


def spread_over_cells(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], n: int) -> np.ndarray:
    """Indices of ``n`` of the (ranked, best first) positions, taken in turns from the cells of a grid with
    about four per cell: the first of every cell, then the second, ... (order kept within each turn)."""
    side = max(1, int(math.ceil(math.sqrt(n / 4))))
    cell = (np.minimum(y * side // shape[0], side - 1) * side + np.minimum(x * side // shape[1], side - 1)).astype(int)
    turn = np.zeros(len(x), int)
    seen: dict[int, int] = {}
    for i, c in enumerate(cell):
        turn[i] = seen.get(c, 0)
        seen[c] = turn[i] + 1
    return np.sort(np.lexsort((np.arange(len(x)), turn))[:n])


def _convolve_valid(cut: np.ndarray, basis: KernelBasis) -> np.ndarray:
    """Separable 'valid' convolution of ``cut`` with every raw basis function: (n_raw, m, m)."""
    L = basis.size
    fx = basis.factors_x[:, ::-1]
    fy = basis.factors_y[:, ::-1]
    along_x = sliding_window_view(cut, L, axis=1) @ fx.T  # (M, m, n_raw)
    windows = sliding_window_view(along_x, L, axis=0)  # (m, m, n_raw, L)
    return np.einsum("yxkl,kl->kyx", windows, fy, optimize=True)


def _build_stamps(target_img, target_var, conv_img, conv_var, positions, basis, half_stamp,
                  bg: Chebyshev2D) -> list[_Stamp]:
    h = basis.half
    stamps = []
    yy, xx = np.mgrid[-half_stamp : half_stamp + 1, -half_stamp : half_stamp + 1]
    for x, y in positions:
        t = target_img[y - half_stamp : y + half_stamp + 1, x - half_stamp : x + half_stamp + 1]
        c = conv_img[y - half_stamp - h : y + half_stamp + h + 1, x - half_stamp - h : x + half_stamp + h + 1]
        if c.shape != (2 * (half_stamp + h) + 1,) * 2:
            continue
        raw = _convolve_valid(c.astype(float), basis).reshape(len(basis.factors_x), -1)
        var = (target_var[y - half_stamp : y + half_stamp + 1, x - half_stamp : x + half_stamp + 1]
               + conv_var[y - half_stamp : y + half_stamp + 1, x - half_stamp : x + half_stamp + 1])
        w = 1.0 / np.maximum(var.ravel().astype(float), 1e-30)
        target = t.ravel().astype(float)
        a = np.vstack([basis.transform @ raw, bg.terms((xx + x).ravel(), (yy + y).ravel())]).T
        aw = a * w[:, None]
        sw = np.sqrt(w)
        stamps.append(_Stamp(float(x), float(y), a.T @ aw, aw.T @ target, a.T @ sw, float(sw @ target),
                             float(target @ (w * target)), len(target)))
    return stamps


def _solve(m: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve the normal equations after scaling them to unit diagonal (the columns differ by decades)."""
    scale = np.sqrt(np.maximum(np.diag(m), 1e-300))
    sol = np.linalg.lstsq(m / np.outer(scale, scale), b / scale, rcond=None)[0]
    return sol / scale


def _solve_with_sum(m: np.ndarray, b: np.ndarray, kernel_sum: float | None,
                    sum_error: float) -> tuple[np.ndarray, float]:
    """Normal equations solved with parameter 0 (the kernel sum) free, then held at ``kernel_sum`` when the free
    value is more than 2 ``sum_error`` from it; also returns the free value.

    At high S/N the free sum is exact and more precise than any flux ratio, and holding it at a value a few
    1e-4 off would bend the kernel's shape to absorb the difference; where it is biased (noise in the
    convolved image, PSF wings beyond the kernel's reach), the difference shows and the sum is held.
    """
    sol = _solve(m, b)
    free = float(sol[0])
    if kernel_sum is None or not abs(free - kernel_sum) > 2 * sum_error:
        return sol, free
    sol[0] = kernel_sum
    sol[1:] = _solve(m[1:, 1:], b[1:] - m[1:, 0] * kernel_sum)
    return sol, free


def _single_stamp_fit(s: _Stamp, n_basis: int) -> tuple[np.ndarray, float, float]:
    """Per-stamp fit (constant kernel + constant background): coefficients, residual mean and rms."""
    q = n_basis + 1  # the basis columns and the constant background term
    sol = _solve(s.G[:q, :q], s.h[:q])
    return sol, *s.residual_stats(sol)


def _expansion(s: _Stamp, n_basis: int, spatial: Chebyshev2D, n_bg: int) -> np.ndarray:
    """E with (stamp columns) = E (spatial parameters): a_j = sum_k a_jk T_k(x_s, y_s), a_0 constant."""
    n_sp = spatial.n_terms
    n_par = 1 + (n_basis - 1) * n_sp + n_bg
    e = np.zeros((n_basis + n_bg, n_par))
    e[0, 0] = 1.0
    t = spatial.terms(s.x, s.y)
    for j in range(1, n_basis):
        e[j, 1 + (j - 1) * n_sp : 1 + j * n_sp] = t
    e[n_basis + np.arange(n_bg), 1 + (n_basis - 1) * n_sp + np.arange(n_bg)] = 1.0
    return e


def fit_matching_kernel(target_img, target_var, conv_img, conv_var, positions: np.ndarray, basis: KernelBasis,
                        half_stamp: int, spatial_order: int = 1, background_order: int = 2,
                        max_rounds: int = 3, max_mean: float = 0.25, max_rms: float = 1.5,
                        sum_clip: float = 3.0, min_candidates: int = 3, kernel_sum: float | None = None,
                        kernel_sum_error: float = 0.0) -> KernelFit:
    """Fit K and the background so that K * conv_img + background ~ target_img on the stamps.

    With ``kernel_sum`` (measured apart, see photometric_scale) the sum is held at that value, and only the
    shape and the background fitted, whenever the free fit's sum disagrees with it beyond its error.
    """
    ny, nx = target_img.shape
    full_bg = Chebyshev2D(background_order, nx, ny)
    stamps = _build_stamps(target_img, target_var, conv_img, conv_var, positions, basis, half_stamp, full_bg)
    n_candidates = len(stamps)
    if n_candidates < min_candidates:
        raise InsufficientKernelSourcesError(
            f"only {n_candidates} usable kernel sources (need {min_candidates}): too few clean, unsaturated "
            "point sources with S/N 10-500 in the overlap")
    n_basis = basis.n
    singles = [_single_stamp_fit(s, n_basis) for s in stamps]
    sums = np.array([sol[0] for sol, _, _ in singles])
    med = np.median(sums)
    spread = 1.4826 * np.median(np.abs(sums - med)) + 1e-6 * abs(med)
    good = np.abs(sums - med) <= sum_clip * spread
    good &= np.array([abs(m) <= max_mean and r <= max_rms for _, m, r in singles]) | (good.sum() < min_candidates)
    if good.sum() < min_candidates:
        good = np.argsort(np.abs(sums - med)) < min_candidates
    for round_ in range(max_rounds + 1):
        used = [s for s, g in zip(stamps, good) if g]
        order = spatial_order
        while order > 0 and len(used) < 3 * Chebyshev2D(order, nx, ny).n_terms:
            order -= 1
        spatial = Chebyshev2D(order, nx, ny)
        bg = Chebyshev2D(background_order if len(used) >= 2 * full_bg.n_terms else 0, nx, ny)
        q = n_basis + bg.n_terms
        expansions = [_expansion(s, n_basis, spatial, bg.n_terms) for s in stamps]
        m = sum(e.T @ s.G[:q, :q] @ e for s, e, g in zip(stamps, expansions, good) if g)
        b = sum(e.T @ s.h[:q] for s, e, g in zip(stamps, expansions, good) if g)
        sol, free_sum = _solve_with_sum(m, b, kernel_sum, kernel_sum_error)
        stats = np.array([s.residual_stats(e @ sol) for s, e in zip(stamps, expansions)])
        bad_now = good & ((np.abs(stats[:, 0]) > max_mean) | (stats[:, 1] > max_rms))
        if round_ == max_rounds or not bad_now.any() or (good & ~bad_now).sum() < min_candidates:
            break  # ``good`` stays the set the kernel was fitted on, which is what gets reported
        good = good & ~bad_now
    coeffs = np.zeros((n_basis, spatial.n_terms))
    coeffs[0, 0] = sol[0]
    coeffs[1:] = sol[1 : 1 + (n_basis - 1) * spatial.n_terms].reshape(n_basis - 1, spatial.n_terms)
    kernel = SpatialKernel(basis, coeffs, spatial)
    bg_coeffs = sol[1 + (n_basis - 1) * spatial.n_terms :]
    kept = stats[good]
    log.info("kernel fit: %d candidates, %d used, sum %.4f, residual mean %.3f rms %.3f",
             n_candidates, int(good.sum()), kernel.kernel_sum, kept[:, 0].mean(), kept[:, 1].mean())
    return KernelFit(kernel, bg, bg_coeffs, n_candidates, int(good.sum()), n_candidates - int(good.sum()),
                     float(kept[:, 0].mean()), float(kept[:, 1].mean()),
                     np.array([[s.x, s.y] for s, g in zip(stamps, good) if g]), free_sum)
