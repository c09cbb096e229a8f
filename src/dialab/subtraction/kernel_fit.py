"""Fitting the PSF-matching kernel: candidates, per-stamp fits, the spatial model, rejection.

The model for a stamp is  target ~ sum_j a_j(x, y) (B_j * image) + background(x, y),  with
a_0 (the kernel sum) constant over the image, the other a_j Chebyshev polynomials of the
stamp position and the differential background a Chebyshev polynomial of the pixel position.

The convolved image is noisy, so its columns' normal matrix A^T W A carries that noise's expected power,
which shrinks the kernel towards zero (regression dilution): the many faint stamps bend its shape, and bright
sources leave residuals of 1-4% of their flux. With ``correct_noise`` (the default) the fit subtracts that
expected power (corrected least squares): the convolved image's variance, with its measured pixel
correlation, through each pair of basis functions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import scipy.linalg
from scipy import ndimage

from ..errors import InsufficientKernelSourcesError
from ..imageops import Chebyshev2D, correlate_valid, window_any
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
    residual_mean: float  # the kept stamps' median normalised residual mean and rms: the typical stamp's (the
    residual_rms: float  # brightest stamps' residuals, far above their noise, are kept and would dominate a mean)
    positions: np.ndarray  # (n_used, 2) x, y of the stamps kept
    free_sum: float = float("nan")  # the sum a free least-squares fit gave (equal to the sum unless it was held)
    regularization: float = 0.0  # the penalty strength used, relative to the data's (0: none)

    def background_image(self, shape: tuple[int, int]) -> np.ndarray:
        return self.background.evaluate(self.background_coeffs, shape)

    def add_background(self, image: np.ndarray, sign: float = 1.0) -> np.ndarray:
        """``image`` + sign B in place (float32): the same values as adding ``background_image``, without its
        full-size buffer."""
        return self.background.evaluate(sign * np.asarray(self.background_coeffs), image.shape, add_to=image)


@dataclass
class _Stamps:
    """The kernel stamps reduced to the sums a least-squares fit needs, stacked (one row per stamp).

    With A a stamp's columns [basis-convolved image (n), background terms (m)], weights w and target t:
    G = A^T W A, h = A^T W t, u = A^T sqrt(w), v = sum sqrt(w) t, tt = t^T W t. Any model that is a linear
    map of these columns is fitted, and its residuals summarised, from them alone.
    """

    x: np.ndarray
    y: np.ndarray
    G: np.ndarray  # (S, q, q)
    h: np.ndarray  # (S, q)
    u: np.ndarray
    v: np.ndarray
    tt: np.ndarray
    npix: np.ndarray
    noise: np.ndarray | None  # (S, n, n): the convolved image's noise power in G's basis block (None: no correction)
    signal: np.ndarray  # (S, 2): mean and rms of sqrt(w) (t - the stamp's border median): the source, sky-free

    def __len__(self) -> int:
        return len(self.x)

    def summed(self, select, q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The normal matrix (q x q), its expected noise power (same shape, zero outside the basis block) and
        the right-hand side, summed over the selected stamps."""
        G = self.G[select][..., :q, :q]
        h = self.h[select][..., :q]
        if G.ndim == 3:
            G, h = G.sum(axis=0), h.sum(axis=0)
        padded = np.zeros((q, q))
        if self.noise is not None:
            noise = self.noise[select]
            n = noise.shape[-1]
            padded[:n, :n] = noise.sum(axis=0) if noise.ndim == 3 else noise
        return G, padded, h

    def chi2(self, c: np.ndarray, select=slice(None)) -> np.ndarray:
        """sum w (t - A c)^2 per stamp for column coefficients c, (S, k) with k <= q (zero-padded), of the
        ``select``-ed stamps (c then holds their rows only)."""
        k = c.shape[1]
        quad = np.einsum("si,sij,sj->s", c, self.G[select, :k, :k], c)
        return self.tt[select] - 2 * np.einsum("si,si->s", c, self.h[select, :k]) + quad

    def residual_stats(self, c: np.ndarray) -> np.ndarray:
        """(S, 2): mean and rms of sqrt(w) (t - A c) for column coefficients c, (S, k)."""
        mean = (self.v - np.einsum("si,si->s", c, self.u[:, : c.shape[1]])) / self.npix
        return np.column_stack([mean, np.sqrt(np.maximum(self.chi2(c), 0.0) / self.npix)])


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


@dataclass(frozen=True)
class KernelCandidates:
    """Where kernel stamps go, and the compact sources among the candidates (point-like, isolated where enough
    are): the stars' flux ratio is measured on those, since a weighted or aperture flux of a galaxy or a blend is
    not the same fraction of its light in two images of different PSFs."""

    positions: np.ndarray  # (n, 2) integer x, y
    compact: np.ndarray  # (m, 2) integer x, y
    # usable science sources of S/N >= BRIGHT_SNR with a counterpart in the template, and all of them: a template
    # of the same field shows nearly all (check_subtraction)
    counterparts: tuple[int, int] = (0, 0)


#: Science sources this significant show in any template of their field, however much shallower.
BRIGHT_SNR = 100.0


def select_kernel_candidates(science, template, half_stamp: int, snr_range=(10.0, 500.0),
                             max_candidates: int = 1000, sigma_pix: float = 2.0,
                             compact_only: bool = False, max_compact: int | None = None) -> KernelCandidates:
    """Sources in the science image usable as kernel stamps.

    Sources with S/N in ``snr_range``, away from the border, with a counterpart in the template (S/N >= 5),
    no BAD/SAT/EDGE/NO_DATA pixel of either image inside the stamp and no injected fake within 5 PSF sigma,
    brightest first; when more qualify than ``max_candidates``, they are spread over the image (the brightest of
    each cell of a grid first), as the spatial model needs coverage, not numbers. The compact ones, which measure
    the stars' flux ratio, are capped at ``max_compact`` (default ``max_candidates``) instead: a pixel basis's
    stamps are few (their normal matrices are large), the ratio's weighted fluxes cheap. Galaxies and blends carry the
    kernel as well as stars do (target = K * convolved holds for any scene) and are kept unless ``compact_only``:
    on fields where galaxies outnumber stars, and at the brightest, most extended sources (whose residuals
    dominate a difference), the kernel is then fitted where it matters.
    """
    stars = find_stars(science, sigma_pix, snr_range[0], radius_pix=max(5, int(math.ceil(3 * sigma_pix))),
                       max_candidates=max(STARS_MEASURED, int(1.5 * max_candidates)))
    keep = stars.snr <= snr_range[1]
    stars = stars.select(keep)
    if len(stars) == 0:
        return KernelCandidates(np.zeros((0, 2), int), np.zeros((0, 2), int))
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
    seen = counterpart_snr(template, ix[ok], iy[ok], sigma_pix) >= MIN_COUNTERPART_SNR
    bright = stars.snr[ok] >= BRIGHT_SNR
    counterparts = (int((seen & bright).sum()), int(bright.sum()))
    ok[ok] &= seen
    if injected.any():  # a fake differs between the images by design: none near a candidate's core, and
        # none within 5 sigma while 10 candidates remain (on a small image, the rejection loop handles the rest)
        ok[ok] &= ~window_any(injected, ix[ok], iy[ok], int(np.ceil(2 * sigma_pix)))
        clear = ok.copy()
        clear[ok] &= ~window_any(injected, ix[ok], iy[ok], int(np.ceil(5 * sigma_pix)))
        if clear.sum() >= 10:
            ok = clear
    compact = ok.copy()
    if (compact & stars.isolated).sum() >= 10:
        compact &= stars.isolated
    if compact.sum() >= 10:
        # any compact source measures the flux ratio (not only stars): only the clearly extended are left out
        compact[compact] &= stellar_locus(stars.sigma[compact], stars.x[compact], stars.y[compact], width=0.3,
                                          upper_sigmas=10.0)
    def spread(sel: np.ndarray, n: int) -> np.ndarray:
        idx = np.nonzero(sel)[0]
        if len(idx) > n:
            idx = idx[spread_over_cells(ix[idx], iy[idx], (ny, nx), n)]
        return np.column_stack([ix[idx], iy[idx]])

    return KernelCandidates(spread(compact if compact_only else ok, max_candidates),
                            spread(compact, max_candidates if max_compact is None else max_compact), counterparts)


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


def _noise_power(basis: KernelBasis, conv_var: np.ndarray, w: np.ndarray,
                 correlation: np.ndarray | None) -> np.ndarray:
    """E[noise part of A^T W A] in the basis block: sum_pix w sum_{r, r'} B_j(r) B_k(r') s(r) s(r') c(r - r'),
    with s(r)^2 = sum_pix w(pix) var(pix - r) / sum w (the variance each kernel pixel's column sees) and c the
    noise correlation (None: white)."""
    L = basis.size
    d = correlate_valid(conv_var, w)[::-1, ::-1]
    bs = basis.images() * np.sqrt(np.maximum(d, 0.0))[None]
    flat = bs.reshape(basis.n, L * L)
    if correlation is None or np.count_nonzero(correlation) == 1:
        return flat @ flat.T
    return flat @ ndimage.convolve(bs, correlation[None], mode="constant").reshape(basis.n, L * L).T


def _build_stamps(target_img, target_var, conv_img, conv_var, positions, basis, half_stamp,
                  bg: Chebyshev2D, correlation: np.ndarray | None = None, correct_noise: bool = True) -> _Stamps:
    h = basis.half
    yy, xx = np.mgrid[-half_stamp : half_stamp + 1, -half_stamp : half_stamp + 1]
    q = basis.n + bg.n_terms
    S = len(positions)
    # filled in place: the normal matrices of a pixel basis are the fit's largest memory
    G, hv, u = np.empty((S, q, q)), np.empty((S, q)), np.empty((S, q))
    x_, y_, v, tt, npix = (np.empty(S) for _ in range(5))
    signal = np.empty((S, 2))
    noise = np.empty((S, basis.n, basis.n)) if correct_noise else None
    k = 0
    for x, y in positions:
        stamp = (slice(y - half_stamp, y + half_stamp + 1), slice(x - half_stamp, x + half_stamp + 1))
        reach = (slice(y - half_stamp - h, y + half_stamp + h + 1), slice(x - half_stamp - h, x + half_stamp + h + 1))
        c = conv_img[reach]
        if c.shape != (2 * (half_stamp + h) + 1,) * 2:
            continue
        conv = basis.convolve_valid(c.astype(float)).reshape(basis.n, -1)
        var = target_var[stamp].astype(float) + conv_var[stamp]
        w = 1.0 / np.maximum(var, 1e-30)
        if noise is not None:
            noise[k] = _noise_power(basis, conv_var[reach].astype(float), w, correlation)
        w = w.ravel()
        target = target_img[stamp].ravel().astype(float)
        a = np.vstack([conv, bg.terms((xx + x).ravel(), (yy + y).ravel())]).T
        aw = a * w[:, None]
        sw = np.sqrt(w)
        np.matmul(a.T, aw, out=G[k])
        hv[k], u[k] = aw.T @ target, a.T @ sw
        x_[k], y_[k], v[k], tt[k], npix[k] = x, y, sw @ target, target @ (w * target), len(target)
        source = sw * (target - np.median(_border(target_img[stamp])))
        signal[k] = abs(source.sum()) / len(target), np.sqrt(source @ source / len(target))
        k += 1
    return _Stamps(x_[:k], y_[:k], G[:k], hv[:k], u[:k], v[:k], tt[:k], npix[:k],
                   None if noise is None else noise[:k], signal[:k])


def _border(stamp: np.ndarray) -> np.ndarray:
    return np.concatenate([stamp[0], stamp[-1], stamp[1:-1, 0], stamp[1:-1, -1]])


#: A stamp is rejected only when its residual is also beyond these fractions of its own (sky-free) signal,
#: mean and rms: no kernel matches a bright source to its photon noise (PSF cores and spikes, undersampled or
#: drizzled pixels), and rejecting the brightest sources for that leaves the kernel unfitted where the largest
#: residuals are. A variable source, a defect or a blend that differs is still rejected.
RESIDUAL_SIGNAL_FRACTION = (0.1, 0.3)


def outlier_stamps(stats: np.ndarray, stamps: _Stamps, max_mean: float, max_rms: float,
                   fractions: tuple[float, float] = RESIDUAL_SIGNAL_FRACTION) -> np.ndarray:
    """Stamps whose residual (``residual_stats``) exceeds the noise limits, |mean| > ``max_mean`` or
    rms > ``max_rms`` (units of the noise), and also the ``fractions`` of the stamp's signal (its rms residual
    counted in excess of the noise)."""
    excess = np.sqrt(np.maximum(stats[:, 1] ** 2 - 1.0, 0.0))
    bad_mean = (np.abs(stats[:, 0]) > max_mean) & (np.abs(stats[:, 0]) > fractions[0] * stamps.signal[:, 0])
    bad_rms = (stats[:, 1] > max_rms) & (excess > fractions[1] * stamps.signal[:, 1])
    return bad_mean | bad_rms


#: Largest fraction of a direction's power taken out as the convolved image's noise: a direction where the
#: noise dominates the signal is corrected only this far, so the corrected matrix stays well conditioned.
MAX_NOISE_FRACTION = 0.5


def corrected(m: np.ndarray, noise: np.ndarray, max_fraction: float = MAX_NOISE_FRACTION) -> np.ndarray:
    """m less its expected noise power: with noise V = m V diag(mu) (generalized eigenvectors, V^T m V = I),
    m - noise = (m V) diag(1 - mu) (m V)^T, mu clipped to ``max_fraction`` (a noise estimate larger than the
    power seen would make the matrix indefinite)."""
    if not noise.any():
        return m
    scale = np.sqrt(np.maximum(np.diag(m), 1e-300))
    ms, ns = m / np.outer(scale, scale), noise / np.outer(scale, scale)
    try:
        mu, v = scipy.linalg.eigh(ns, ms)
    except np.linalg.LinAlgError:
        return m
    mv = ms @ v
    return (mv * (1 - np.clip(mu, 0.0, max_fraction))) @ mv.T * np.outer(scale, scale)


def _solve(m: np.ndarray, b: np.ndarray, positive: bool = False) -> np.ndarray:
    """Solve the normal equations after scaling them to unit diagonal (the columns differ by decades).

    A penalised system (``positive``) is positive definite: Cholesky, a hundred times cheaper than the SVD of
    the least-squares fallback for a pixel basis's hundreds of parameters.
    """
    scale = np.sqrt(np.maximum(np.diag(m), 1e-300))
    ms, bs = m / np.outer(scale, scale), b / scale
    if positive:
        try:
            return scipy.linalg.cho_solve(scipy.linalg.cho_factor(ms), bs) / scale
        except np.linalg.LinAlgError:
            pass
    return np.linalg.lstsq(ms, bs, rcond=None)[0] / scale


#: How far (in the stars' ratio error, with its 0.1% systematic floor) a free kernel sum may lie from the stars'
#: flux ratio before the sum is held at the ratio. Free sums of Kolmogorov x Airy truth pairs came out 0.3-0.5% low
#: (wings beyond the kernel's reach) while their stars' ratio was good to 0.1-0.3%: at 1.5 sigma two of three kept
#: the biased free sum. The old ratio's 0.27% crowding bias made noise-free Gaussian pairs fail at 1 sigma;
#: the cross-weighted ratio has none (tests/test_subtraction.py, the quadrature kernel).
SUM_HOLD_SIGMAS = 1.0


def _solve_with_sum(m: np.ndarray, b: np.ndarray, kernel_sum: float | None,
                    sum_error: float, positive: bool = False) -> tuple[np.ndarray, float]:
    """Normal equations solved with parameter 0 (the kernel sum) free, then held at ``kernel_sum`` when the free
    value is more than ``SUM_HOLD_SIGMAS`` x ``sum_error`` from it; also returns the free value.

    At high S/N the free sum is exact and more precise than any flux ratio, and holding it at a value a few
    1e-4 off would bend the kernel's shape to absorb the difference; where it is biased (noise in the
    convolved image, PSF wings beyond the kernel's reach: 0.5-1.6% low on the truth pairs even with the noise
    correction), the difference shows and the sum is held.
    """
    sol = _solve(m, b, positive)
    free = float(sol[0])
    if kernel_sum is None or not abs(free - kernel_sum) > SUM_HOLD_SIGMAS * sum_error:
        return sol, free
    sol[0] = kernel_sum
    sol[1:] = _solve(m[1:, 1:], b[1:] - m[1:, 0] * kernel_sum, positive)
    return sol, free


@dataclass(frozen=True)
class Penalty:
    """A quadratic penalty on the kernel, strength * a^T R a for the constant term and, for each spatial term t,
    strength * a^T R_t a over the sum and that term's coefficients (``variation[t - 1]``: a pull towards the PSF
    models' variation at the fitted sum), or a^T R' a over the term's coefficients alone (R without the sum's row
    and column: smoothness, no variation) where the models give none. R and R_t are in basis coefficients
    (``basis.laplacian_penalty``)."""

    R: np.ndarray
    strength: float = 0.0
    relative: float | None = None  # the strength in units of trace(data normal matrix) / trace(R); when given
    # before the fit, it is used instead of cross-validation
    variation: tuple[np.ndarray, ...] = ()

    def matrix(self, n_basis: int, n_sp: int, n_bg: int) -> np.ndarray:
        """The penalty in the spatial parameters (add strength times it to the normal matrix)."""
        n_par = 1 + (n_basis - 1) * n_sp + n_bg
        P = np.zeros((n_par, n_par))
        term0 = np.concatenate([[0], 1 + np.arange(n_basis - 1) * n_sp])
        P[np.ix_(term0, term0)] = self.R
        for t in range(1, n_sp):
            idx = 1 + np.arange(n_basis - 1) * n_sp + t
            if t <= len(self.variation):
                with_sum = np.concatenate([[0], idx])
                P[np.ix_(with_sum, with_sum)] += self.variation[t - 1]
            else:
                P[np.ix_(idx, idx)] = self.R[1:, 1:]
        return P


def _spatial_system(stamps: _Stamps, weights: np.ndarray, n_basis: int, terms: np.ndarray,
                    n_bg: int, with_noise: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Normal matrix, its expected noise power and the right-hand side of the spatial model: sums over stamps
    of weights_s E_s^T G_s E_s (and of the noise power alike).

    The parameters are [a_0, a_jk (j = 1..n-1, k over the spatial terms T_k), background]: a stamp's basis
    column j >= 1 takes sum_k a_jk T_k(x_s, y_s), and T_0 = 1. Every block is a slice of one contraction of
    the stacked G with the weighted products T_k T_l.
    """
    n_sp = terms.shape[1]
    q = n_basis + n_bg
    nb = n_basis - 1
    S, Q = stamps.G.shape[:2]
    tt = (terms[:, :, None] * terms[:, None, :] * weights[:, None, None]).reshape(S, n_sp * n_sp)
    ht = (stamps.h * weights[:, None]).T @ terms  # (Q, n_sp)
    B, g = slice(1, n_basis), slice(n_basis, q)
    n_par = 1 + nb * n_sp + n_bg
    pB, pg = slice(1, 1 + nb * n_sp), slice(1 + nb * n_sp, n_par)

    def assemble(stack: np.ndarray) -> np.ndarray:
        k = stack.shape[1]
        full = np.zeros((q, q, n_sp, n_sp))
        full[:min(k, q), :min(k, q)] = (stack.reshape(S, k * k).T @ tt).reshape(k, k, n_sp, n_sp)[:q, :q]
        m = np.empty((n_par, n_par))
        m[0, 0] = full[0, 0, 0, 0]
        m[0, pB] = m[pB, 0] = full[0, B, 0, :].ravel()
        m[0, pg] = m[pg, 0] = full[0, g, 0, 0]
        m[pB, pB] = full[B, B].transpose(0, 2, 1, 3).reshape(nb * n_sp, nb * n_sp)
        m[pB, pg] = full[B, g, :, 0].transpose(0, 2, 1).reshape(nb * n_sp, n_bg)
        m[pg, pB] = m[pB, pg].T
        m[pg, pg] = full[g, g, 0, 0]
        return m

    b = np.concatenate([[ht[0, 0]], ht[B].ravel(), ht[g, 0]])
    if not with_noise:
        return assemble(stamps.G), None, b
    noise = assemble(stamps.noise) if stamps.noise is not None else np.zeros((n_par, n_par))
    return assemble(stamps.G), noise, b


def _stamp_coefficients(sol: np.ndarray, n_basis: int, terms: np.ndarray, n_bg: int) -> np.ndarray:
    """(S, n_basis + n_bg): each stamp's column coefficients under the spatial solution."""
    n_sp = terms.shape[1]
    a = sol[1 : 1 + (n_basis - 1) * n_sp].reshape(n_basis - 1, n_sp)
    c = np.empty((len(terms), n_basis + n_bg))
    c[:, 0] = sol[0]
    c[:, 1:n_basis] = terms @ a.T
    c[:, n_basis:] = sol[1 + (n_basis - 1) * n_sp :]
    return c


def _penalised_solve(m: np.ndarray, b: np.ndarray, penalty: Penalty | None, n_basis: int, n_sp: int, n_bg: int,
                     kernel_sum: float | None = None, sum_error: float = 0.0) -> tuple[np.ndarray, float]:
    positive = penalty is not None and penalty.strength > 0
    if positive:
        m = m + penalty.strength * penalty.matrix(n_basis, n_sp, n_bg)
    return _solve_with_sum(m, b, kernel_sum, sum_error, positive)


#: Regularization strengths tried, in units of trace(data normal matrix) / trace(R).
STRENGTH_GRID = np.logspace(-7, 4, 23)


def choose_strength(stamps: _Stamps, good: np.ndarray, n_basis: int, penalty: Penalty, folds: int = 5) -> Penalty:
    """The penalty strength that best predicts held-out stamps (k-fold cross-validation over the stamps,
    constant kernel and background): enough to stop the kernel fitting the noise, no more.

    A fold's held-out chi^2 needs only its summed G, h and t^T W t; one generalized eigendecomposition of the
    fold's training system (P v = nu T v, V^T T V = I) gives its solution at every strength,
    (T + lam P)^-1 = V diag(1 / (1 + lam nu)) V^T.
    """
    q = n_basis + 1
    idx = np.nonzero(good)[0]
    trace = np.diagonal(stamps.G, axis1=1, axis2=2)[idx, :n_basis].sum()
    unit = trace / max(np.trace(penalty.R), 1e-300)
    if penalty.relative is not None:  # a fixed strength: no folds to build
        return replace(penalty, strength=penalty.relative * unit)
    folds = max(2, min(folds, len(idx)))
    fold = np.arange(len(idx)) % folds
    G, noise, h = zip(*(stamps.summed(idx[fold == f], q) for f in range(folds)))
    tt = np.array([stamps.tt[idx[fold == f]].sum() for f in range(folds)])
    G_all, noise_all, h_all = sum(G), sum(noise), sum(h)
    P = penalty.matrix(n_basis, 1, 1)
    lams = STRENGTH_GRID * unit
    scores = np.zeros((folds, len(lams)))
    for f in range(folds):
        train = corrected(G_all - G[f], noise_all - noise[f])
        scale = np.sqrt(np.maximum(np.diag(train), 1e-300))
        try:
            nu, v = scipy.linalg.eigh(P / np.outer(scale, scale), train / np.outer(scale, scale))
            c = v.T @ ((h_all - h[f]) / scale)
            a = (v @ (c[:, None] / (1 + lams[None, :] * nu[:, None]))) / scale[:, None]  # (q, n_lams)
        except np.linalg.LinAlgError:  # a training system without full rank: one solve per strength
            a = np.column_stack([_solve(train + lam * P, h_all - h[f], positive=True) for lam in lams])
        scores[f] = tt[f] - 2 * h[f] @ a + np.einsum("il,ij,jl->l", a, G[f], a)
    # the one-standard-error rule, paired over folds: the strongest penalty whose held-out chi^2 exceeds the
    # best one's by less than the standard error of that excess (a smoother kernel the data cannot tell from
    # the best one is preferred: its outer pixels carry less noise into the difference)
    lowest = int(np.argmin(scores.sum(axis=0)))
    excess = scores - scores[:, [lowest]]
    error = np.sqrt(folds) * excess.std(axis=0, ddof=1)
    best = int(np.nonzero(excess.sum(axis=0) <= error)[0].max())
    if best in (0, len(STRENGTH_GRID) - 1):
        log.info("kernel regularization: the best strength is at the end of the grid (%.1e)", STRENGTH_GRID[best])
    return replace(penalty, strength=float(STRENGTH_GRID[best] * unit), relative=float(STRENGTH_GRID[best]))


def choose_spatial_order(stamps: _Stamps, good: np.ndarray, n_basis: int, penalty: Penalty | None, max_order: int,
                         n_bg: int, shape: tuple[int, int], folds: int = 5) -> int:
    """The kernel's spatial order (0 to ``max_order``) that best predicts held-out stamps (k-fold cross-validation
    over the stamps, with the background and the penalty as fitted; the lowest order whose held-out chi^2
    exceeds the best one's by less than the standard error of that excess, paired over folds, and than the
    parameters the best one adds): a PSF whose change over the image is
    not linear gets its curvature, a few stamps or a flat PSF no more terms than they support.

    Each fold's normal matrix is assembled once, at the highest order (a lower order's is a sub-block: the
    spatial terms are ordered by degree), and solved without the convolved image's noise correction, whose
    eigendecomposition of a delta kernel's ~2000 parameters costs seconds per solve (it moves every order alike).
    """
    ny, nx = shape
    idx = np.nonzero(good)[0]
    folds = max(2, min(folds, len(idx)))
    train_size = len(idx) - -(-len(idx) // folds)
    orders = [o for o in range(max_order + 1) if o == 0 or train_size >= 3 * Chebyshev2D(o, nx, ny).n_terms]
    if len(orders) == 1:
        return orders[0]
    top = Chebyshev2D(orders[-1], nx, ny)
    terms = top.terms(stamps.x, stamps.y).T
    fold = np.full(len(stamps), -1)
    fold[idx] = np.arange(len(idx)) % folds
    parts = [_spatial_system(stamps, (fold == f).astype(float), n_basis, terms, n_bg, with_noise=False)
             for f in range(folds)]
    m_all, b_all = sum(p[0] for p in parts), sum(p[2] for p in parts)
    nb = n_basis - 1
    scores = np.zeros((folds, len(orders)))
    for j, order in enumerate(orders):
        n_sp = Chebyshev2D(order, nx, ny).n_terms
        keep = np.concatenate([[0], 1 + (np.arange(nb)[:, None] * top.n_terms + np.arange(n_sp)).ravel(),
                               1 + nb * top.n_terms + np.arange(n_bg)])
        sub = np.ix_(keep, keep)
        penalised = penalty is not None and penalty.strength > 0
        prior = penalty.strength * penalty.matrix(n_basis, n_sp, n_bg) if penalised else 0.0
        for f, (m_f, _, b_f) in enumerate(parts):
            sol = _solve(m_all[sub] - m_f[sub] + prior, (b_all - b_f)[keep], penalised)
            held = fold == f
            scores[f, j] = stamps.chi2(_stamp_coefficients(sol, n_basis, terms[held, :n_sp], n_bg), held).sum()
    lowest = int(np.argmin(scores.sum(axis=0)))
    excess = scores - scores[:, [lowest]]
    error = np.sqrt(folds) * excess.std(axis=0, ddof=1)
    # and at least one unit of chi^2 per parameter the better order adds: a gain of 40 in 334000 over 130 more
    # parameters (a constant PSF) is a systematic trifle, however consistent over the folds
    n_par = np.array([1 + nb * Chebyshev2D(o, nx, ny).n_terms + n_bg for o in orders])
    allowed = np.maximum(error, n_par[lowest] - n_par)
    chosen = orders[int(np.nonzero(excess.sum(axis=0) <= allowed)[0].min())]
    log.info("kernel spatial order %d (held-out chi^2 by order %s)", chosen,
             ", ".join(f"{o}: {s:.0f}" for o, s in zip(orders, scores.sum(axis=0))))
    return chosen


def _background_for(n_stamps: int, full: Chebyshev2D) -> Chebyshev2D:
    """The differential background's polynomial: ``full`` with two stamps per term, else a constant."""
    return full if n_stamps >= 2 * full.n_terms else Chebyshev2D(0, full.width, full.height)


def fit_matching_kernel(target_img, target_var, conv_img, conv_var, positions: np.ndarray, basis: KernelBasis,
                        half_stamp: int, spatial_order: int = 1, background_order: int = 2,
                        max_rounds: int = 3, max_mean: float = 0.25, max_rms: float = 1.5,
                        sum_clip: float = 3.0, min_candidates: int = 3, kernel_sum: float | None = None,
                        kernel_sum_error: float = 0.0, penalty: Penalty | None = None,
                        noise_correlation: np.ndarray | None = None, correct_noise: bool = True,
                        choose_order: bool = False) -> KernelFit:
    """Fit K and the background so that K * conv_img + background ~ target_img on the stamps.

    With ``kernel_sum`` (measured apart, see photometric_scale) the sum is held at that value, and only the
    shape and the background fitted, whenever the free fit's sum disagrees with it beyond its error. With a
    ``penalty`` (the delta basis), its strength is chosen by cross-validation over the stamps. With
    ``correct_noise`` the convolved image's expected noise power (pixel correlation ``noise_correlation``,
    default white) is taken out of the normal equations. With ``choose_order`` the spatial order is chosen from
    the stamps (``choose_spatial_order``), ``spatial_order`` being the highest tried.
    """
    ny, nx = target_img.shape
    full_bg = Chebyshev2D(background_order, nx, ny)
    stamps = _build_stamps(target_img, target_var, conv_img, conv_var, positions, basis, half_stamp, full_bg,
                           noise_correlation, correct_noise)
    n_candidates = len(stamps)
    if n_candidates < min_candidates:
        raise InsufficientKernelSourcesError(
            f"only {n_candidates} usable kernel sources (need {min_candidates}): too few clean, unsaturated "
            "point sources with S/N 10-500 in the overlap")
    n_basis = basis.n
    ones = np.ones((n_candidates, 1))
    given = penalty.relative if penalty is not None else None
    if penalty is not None:
        penalty = choose_strength(stamps, np.ones(n_candidates, bool), n_basis, penalty)
    # each stamp alone (constant kernel and background): stamps whose kernel sum is an outlier are left out
    q0 = n_basis + 1
    P0 = penalty.strength * penalty.matrix(n_basis, 1, 1) if penalty is not None else 0.0
    # (each stamp's fit without the noise correction: a single stamp cannot tell its noise from its signal, and
    # only the stamps' agreement matters here)
    singles = np.array([_solve(G + P0, h, positive=penalty is not None)
                        for G, _, h in (stamps.summed(i, q0) for i in range(n_candidates))])
    single_stats = stamps.residual_stats(singles)
    sums = singles[:, 0]
    med = np.median(sums)
    spread = 1.4826 * np.median(np.abs(sums - med)) + 1e-6 * abs(med)
    good = np.abs(sums - med) <= sum_clip * spread
    good &= ~outlier_stamps(single_stats, stamps, max_mean, max_rms) | (good.sum() < min_candidates)
    if good.sum() < min_candidates:
        good = np.argsort(np.abs(sums - med)) < min_candidates
    if penalty is not None:  # again without the outliers
        penalty = choose_strength(stamps, good, n_basis, replace(penalty, strength=0.0, relative=given))
    if choose_order:
        spatial_order = choose_spatial_order(stamps, good, n_basis, penalty, spatial_order,
                                             _background_for(int(good.sum()), full_bg).n_terms, (ny, nx))
    for round_ in range(max_rounds + 1):
        n_used = int(good.sum())
        order = spatial_order
        while order > 0 and n_used < 3 * Chebyshev2D(order, nx, ny).n_terms:
            order -= 1
        spatial = Chebyshev2D(order, nx, ny)
        bg = _background_for(n_used, full_bg)
        terms = spatial.terms(stamps.x, stamps.y).T if spatial.n_terms > 1 else ones
        m, noise, b = _spatial_system(stamps, good.astype(float), n_basis, terms, bg.n_terms)
        sol, free_sum = _penalised_solve(corrected(m, noise), b, penalty, n_basis, spatial.n_terms, bg.n_terms, kernel_sum,
                                         kernel_sum_error)
        stats = stamps.residual_stats(_stamp_coefficients(sol, n_basis, terms, bg.n_terms))
        bad_now = good & outlier_stamps(stats, stamps, max_mean, max_rms)
        if round_ == max_rounds or not bad_now.any() or (good & ~bad_now).sum() < min_candidates:
            break  # ``good`` stays the set the kernel was fitted on, which is what gets reported
        good = good & ~bad_now
    coeffs = np.zeros((n_basis, spatial.n_terms))
    coeffs[0, 0] = sol[0]
    coeffs[1:] = sol[1 : 1 + (n_basis - 1) * spatial.n_terms].reshape(n_basis - 1, spatial.n_terms)
    kernel = SpatialKernel(basis, coeffs, spatial)
    bg_coeffs = sol[1 + (n_basis - 1) * spatial.n_terms :]
    kept = np.median(stats[good], axis=0)
    strength = penalty.relative if penalty is not None else 0.0
    log.info("kernel fit: %s basis (%d functions), %d candidates, %d used, sum %.4f, median stamp residual mean %.3f "
             "rms %.3f%s", basis.name, n_basis, n_candidates, int(good.sum()), kernel.kernel_sum, kept[0],
             kept[1], f", regularization {strength:.3g}" if penalty is not None else "")
    return KernelFit(kernel, bg, bg_coeffs, n_candidates, int(good.sum()), n_candidates - int(good.sum()),
                     float(kept[0]), float(kept[1]),
                     np.column_stack([stamps.x[good], stamps.y[good]]), free_sum, strength)
