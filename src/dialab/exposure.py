"""The Exposure container and its FITS formats (described on the formats page of the docs).

Two layouts are read: the LSST-style multi-extension file (IMAGE / MASK / VARIANCE / [PSF,
PSF_GRID]) that dialab also writes, and a *plain* single-image FITS as telescopes write it, whose
variance and mask are derived from the header (GAIN, RDNOISE, SATURATE) and the pixels.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS

from .background import estimate_background
from .errors import BadInputError
from .psf import ApertureCorrection, GaussianPsf, GridPsf, ImagePsf, MoffatPsf, Psf

log = logging.getLogger(__name__)

DEFAULT_MASK_PLANES = (
    "BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "SUSPECT", "NO_DATA",
    "INJECTED", "INJECTED_TEMPLATE", "SAT_TEMPLATE", "HIGH_VARIANCE",
)
#: Planes whose pixels hold no usable data for fitting or measuring.
UNUSABLE_PLANES = ("BAD", "SAT", "NO_DATA", "EDGE")
#: AB magnitude of a flux of 1 nJy.
NJY_ZEROPOINT = 31.4


@dataclass
class MaskPlanes:
    """Mapping of mask-plane name to bit number; unknown planes get the next free bit."""

    bits: dict[str, int] = field(default_factory=lambda: {n: i for i, n in enumerate(DEFAULT_MASK_PLANES)})

    def bit(self, name: str) -> int:
        """Integer value (1 << bit) of a plane, adding the plane if it is new."""
        if name not in self.bits:
            free = sorted(set(range(31)) - set(self.bits.values()))
            if not free:
                raise BadInputError(f"no free mask bit for plane {name}")
            self.bits[name] = free[0]
        return 1 << self.bits[name]

    def bitmask(self, *names: str) -> int:
        value = 0
        for n in names:
            value |= self.bit(n)
        return value



def bits_present(mask: np.ndarray) -> int:
    """Every bit set anywhere in ``mask`` (one pass): planes absent from it can be skipped."""
    return int(np.bitwise_or.reduce(mask, axis=None))


def bits_set(mask: np.ndarray, bits: int) -> np.ndarray:
    """Boolean array: any of ``bits`` set in the int32 ``mask``."""
    if not (0 <= bits < 2**32 and mask.dtype == np.dtype("<i4") and mask.flags.c_contiguous and mask.size):
        return (mask & bits) != 0
    # the bytes that hold the bits are tested alone: a quarter or half of the memory traffic of a full-image
    # test and no int32 temporary (the standard planes are in the low 16 bits, added ones above)
    if bits < 2**16:
        small = (np.uint8, 4) if bits < 2**8 else (np.uint16, 2)
        return (mask.view(small[0])[..., :: small[1]] & small[0](bits)) != 0
    out = np.zeros(mask.shape, bool)
    for byte in range(4):
        part = (bits >> (8 * byte)) & 0xFF
        if part:
            out |= (mask.view(np.uint8)[..., byte::4] & np.uint8(part)) != 0
    return out


@dataclass
class Exposure:
    """An image with its mask, variance, PSF, WCS and observation metadata.

    ``magzero`` is the AB magnitude of one count; ``header`` keeps the primary-header cards that
    have no field of their own, so that they survive a write-then-read.
    """

    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray
    psf: Psf | None = None
    wcs: WCS | None = None
    mask_planes: MaskPlanes = field(default_factory=MaskPlanes)
    visit: int = 0
    detector: int = 0
    band: str = ""
    mjd: float = float("nan")
    exptime: float = float("nan")
    magzero: float = float("nan")
    gain: float = float("nan")
    saturate: float = float("nan")
    header: fits.Header = field(default_factory=fits.Header)
    path: str | None = None
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.image = np.asarray(self.image, dtype=np.float32)
        self.variance = np.asarray(self.variance, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=np.int32)
        if self.image.ndim != 2:
            raise BadInputError(f"image must be 2-d, got shape {self.image.shape}", self.path)
        for name, arr in (("VARIANCE", self.variance), ("MASK", self.mask)):
            if arr.shape != self.image.shape:
                raise BadInputError(
                    f"{name} shape {arr.shape} differs from IMAGE shape {self.image.shape}", self.path)

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    def plane(self, *names: str) -> np.ndarray:
        """Boolean array: any of the named planes set."""
        return bits_set(self.mask, self.mask_planes.bitmask(*names))

    def set_plane(self, name: str, where: np.ndarray) -> None:
        self.mask[where] |= self.mask_planes.bit(name)
        self._derived.clear()

    def clear_plane(self, name: str) -> None:
        self.mask &= ~np.int32(self.mask_planes.bit(name))
        self._derived.clear()

    def derived(self, key, compute):
        """``compute()``, once per state of the pixels: the value is kept while ``image`` and ``mask`` are the
        same arrays and no plane was set, so the sky and the stars of one image are measured once however
        many steps ask (steps that change pixels assign new arrays, as repair and injection do)."""
        value = self.known(key)
        return value if value is not None else self.keep_derived(key, compute())

    def known(self, key):
        """The value derived from the current pixels under ``key``, or None when nothing has asked for it yet."""
        entry = self._derived.get(key)
        return entry[2] if entry is not None and entry[0]() is self.image and entry[1]() is self.mask else None

    def keep_derived(self, key, value):
        """Record ``value`` as derived from the current pixels (a step that changed them knows it still holds)."""
        self._derived[key] = (weakref.ref(self.image), weakref.ref(self.mask), value)
        return value

    @property
    def unusable(self) -> np.ndarray:
        """Pixels with no usable data (BAD, SAT, NO_DATA, EDGE); computed once per state of the mask (photometry
        asks for it once per call, and a full-image plane costs as much as the photometry itself). Read-only."""
        planes = self.derived(("plane", UNUSABLE_PLANES), lambda: self.plane(*UNUSABLE_PLANES))
        planes.flags.writeable = False
        return planes

    @property
    def njy_per_count(self) -> float:
        """Calibration: nJy of one count (NaN when MAGZERO is unknown)."""
        return 10.0 ** (-0.4 * (self.magzero - NJY_ZEROPOINT))

    def copy(self) -> Exposure:
        return dataclasses.replace(
            self, image=self.image.copy(), mask=self.mask.copy(), variance=self.variance.copy(),
            mask_planes=MaskPlanes(dict(self.mask_planes.bits)), header=self.header.copy(),
            wcs=None if self.wcs is None else self.wcs.deepcopy())


# --------------------------------------------------------------------------- reading

_METADATA_CARDS = ("VISIT", "DETECTOR", "BAND", "MJD-OBS", "EXPTIME", "MAGZERO", "GAIN", "SATURATE")
_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "EXTNAME",
               "BZERO", "BSCALE", "PCOUNT", "GCOUNT", "XTENSION", "CHECKSUM", "DATASUM", "INHERIT"}


def _open(path: Path) -> fits.HDUList:
    if not path.exists():
        raise BadInputError("file not found", path)
    if path.is_dir():
        raise BadInputError("is a directory, not a FITS file", path)
    try:
        hdul = fits.open(path, memmap=False)
        hdul.verify("silentfix")
        _ = [h.header for h in hdul]
    except (OSError, ValueError, TypeError) as exc:
        raise BadInputError(f"not a readable FITS file ({exc})", path) from None
    _check_complete(hdul, path)
    return hdul


def _check_complete(hdul: fits.HDUList, path: Path) -> None:
    """A file cut short (an interrupted copy or download) ends inside an HDU's data: say so, naming the HDU."""
    if not hdul or getattr(hdul[0].fileinfo()["file"], "compression", None):
        return  # offsets of a compressed file refer to its uncompressed bytes (astropy reports truncation itself)
    size = path.stat().st_size
    for index, hdu in enumerate(hdul):
        info = hdu.fileinfo()  # a tile-compressed HDU's size is its image's; its span is what the file holds
        end = info["datLoc"] + (info["datSpan"] if isinstance(hdu, fits.CompImageHDU) else hdu.size)
        if end > size:
            name = hdu.name or f"#{index}"
            hdul.close()
            raise BadInputError(f"truncated FITS file: it ends {end - size} bytes into the data of HDU {name} "
                                "(an incomplete copy?)", path)


def _read_wcs(header: fits.Header) -> WCS | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        try:
            w = WCS(header, naxis=2)
        except Exception:  # astropy raises many types for malformed WCS cards
            return None
    return w if w.has_celestial else None


def _first_image(hdul: fits.HDUList, path: Path) -> tuple[np.ndarray, fits.Header]:
    for hdu in hdul:
        if isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)) and hdu.data is not None:
            data = hdu.data
            if data.ndim == 2 and data.size > 0:
                return data, hdu.header
            if data.ndim > 2 and all(n == 1 for n in data.shape[:-2]):
                return data.reshape(data.shape[-2:]), hdu.header
            if data.ndim > 2:
                raise BadInputError(f"the image is a {data.ndim}-d cube of shape {data.shape}: give one 2-d image "
                                    "(one plane per file)", path)
    raise BadInputError("no 2-d image data in any HDU (empty file?)", path)


def _number(header: fits.Header, *keys: str, default: float = float("nan")) -> float:
    for k in keys:
        v = header.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return default


def _integer(header: fits.Header, *keys: str) -> int:
    for k in keys:
        v = header.get(k)
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return int(v)
    return 0


def _band(header: fits.Header) -> str:
    for k in ("BAND", "FILTER", "FILTER1"):
        v = header.get(k)
        if isinstance(v, str) and v.strip():
            return v.split()[0]
    return ""


def _magzero(header: fits.Header) -> float:
    mz = _number(header, "MAGZERO", "MAGZPT", "MAGZP", "ZP")
    if math.isfinite(mz):
        return mz
    if str(header.get("BUNIT", "")).strip().lower() == "mjy/sr":
        pixar = _number(header, "PIXAR_SR")
        if pixar > 0:  # one MJy/sr over the pixel solid angle, in Jy, on the AB scale
            return -2.5 * math.log10(1e6 * pixar / 3631.0)
    return float("nan")


def _metadata(primary: fits.Header, image_header: fits.Header) -> dict:
    h = fits.Header(primary)
    h.update({k: v for k, v in image_header.items() if k not in h and k not in ("", "COMMENT", "HISTORY")})
    return dict(
        visit=_integer(h, "VISIT", "EXPNUM", "EXPID"),
        detector=_integer(h, "DETECTOR", "CCDNUM"),
        band=_band(h),
        mjd=_number(h, "MJD-OBS", "MJD_OBS", "MJD"),
        exptime=_number(h, "EXPTIME", "EXPOSURE"),
        magzero=_magzero(h),
        gain=_number(h, "GAIN", "EGAIN", "GAINA"),
        saturate=_number(h, "SATURATE", "SATURAT", "SATLEVEL", "SATURATA"),
    )


def _extra_cards(header: fits.Header) -> fits.Header:
    out = fits.Header()
    for card in header.cards:
        if card.keyword in _STRUCTURAL or card.keyword in _METADATA_CARDS or card.keyword == "":
            continue
        if card.keyword.startswith(("MP_", "NAXIS")):
            continue
        out.append(card, end=True)
    return out


def read_exposure(path: str | Path, psf: str | Path | Psf | None = None, noise: str | Path | None = None,
                  mask: str | Path | None = None) -> Exposure:
    """Read an exposure from a multi-extension dialab/LSST file or a plain single-image FITS.

    Parameters
    ----------
    path : str or Path
        The FITS file (see the formats page for both layouts).
    psf : str, Path or Psf, optional
        A PSF stamp file or model; overrides the file's PSF HDU.
    noise : str or Path, optional
        A 1-sigma noise map; replaces the variance plane.
    mask : str or Path, optional
        A mask image, non-zero = BAD; ORed into the mask plane.

    Returns
    -------
    Exposure
        Image, mask, variance, PSF (None when neither given nor in the file) and metadata.

    Raises
    ------
    BadInputError
        Naming the file and the problem (missing, truncated, not 2-d, ...).
    """
    path = Path(path)
    with _open(path) as hdul:
        names = [h.name for h in hdul]
        exp = _read_layered(hdul, path) if "IMAGE" in names else _read_plain(hdul, path)
    exp.path = str(path)
    if noise is not None:
        _apply_noise_map(exp, Path(noise))
    if mask is not None:
        _apply_mask_file(exp, Path(mask))
    if psf is not None:
        exp.psf = psf if isinstance(psf, Psf) else read_psf(psf)
    return exp


def _read_layered(hdul: fits.HDUList, path: Path) -> Exposure:
    def data(name):
        if name not in hdul or hdul[name].data is None:
            raise BadInputError(f"HDU {name} is missing or empty", path)
        return hdul[name].data

    image = _native(data("IMAGE"), np.float32)
    if image.ndim != 2:
        raise BadInputError(f"IMAGE must be 2-d, got shape {image.shape}", path)
    variance = _native(data("VARIANCE"), np.float32)
    mask = _native(data("MASK"), np.int32)
    for name, arr in (("VARIANCE", variance), ("MASK", mask)):
        if arr.shape != image.shape:
            raise BadInputError(f"{name} shape {arr.shape} differs from IMAGE shape {image.shape}", path)
    mh = hdul["MASK"].header
    planes = {k[3:]: int(v) for k, v in mh.items() if k.startswith("MP_")}
    primary = hdul[0].header
    if not np.isfinite(image).any():
        raise BadInputError("all pixels are non-finite", path)
    psf = _read_psf_hdus(hdul, path) if "PSF" in hdul else None
    return Exposure(
        image=image, mask=mask, variance=variance, psf=psf, wcs=_read_wcs(hdul["IMAGE"].header),
        mask_planes=MaskPlanes(planes) if planes else MaskPlanes(), header=_extra_cards(primary),
        path=str(path), **_metadata(primary, fits.Header()))


def _native(data: np.ndarray, dtype) -> np.ndarray:
    """``data`` as a native-endian array of ``dtype``. FITS stores big-endian: a plane already of that type is
    byte-swapped in its own buffer (a file's planes are read once, and a copy of each would double the read's
    memory); anything else (scaled integers, other types) is converted."""
    if data.dtype.newbyteorder("=") == np.dtype(dtype) and not data.dtype.isnative and data.flags.writeable \
            and data.flags.c_contiguous:
        return data.byteswap(inplace=True).view(np.dtype(dtype))
    return np.array(data, dtype=dtype)


def _read_plain(hdul: fits.HDUList, path: Path) -> Exposure:
    raw, header = _first_image(hdul, path)
    primary = hdul[0].header
    image = _native(raw, np.float32)  # may swap raw's own bytes: only its dtype is read below
    finite = np.isfinite(image)
    if not finite.any():
        raise BadInputError("all pixels are non-finite", path)
    meta = _metadata(primary, header)
    planes = MaskPlanes()
    mask = np.zeros(image.shape, np.int32)
    mask[~finite] |= planes.bit("NO_DATA")
    if not math.isfinite(meta["saturate"]) and np.issubdtype(raw.dtype, np.integer):
        top = np.iinfo(raw.dtype).max  # an integer frame without SATURATE: the converter's ceiling
        if (raw == top).any():
            meta["saturate"] = float(top)
    if math.isfinite(meta["saturate"]):
        mask[finite & (image >= meta["saturate"])] |= planes.bit("SAT")
    image[~finite] = 0.0
    variance = plain_variance(image, ~finite, meta["gain"], _number(header, "RDNOISE", "READNOIS", "RON",
                                                                        "RDNOISEA", default=0.0), path)
    extra = _extra_cards(primary)
    if header is not primary:
        extra.update(_extra_cards(header))
    return Exposure(image=image, mask=mask, variance=variance, wcs=_read_wcs(header), mask_planes=planes,
                    header=extra, path=str(path), **meta)


def plain_variance(image: np.ndarray, nodata: np.ndarray, gain: float, read_noise_e: float,
                   source: object = None) -> np.ndarray:
    """Per-pixel variance (counts^2) of a plain image.

    With GAIN (e-/count) the sky variance is predicted from the sky level and the read noise (e-),
    and sources add their Poisson term (image - sky) / GAIN. When the image has no sky left (a
    sky-subtracted or rescaled frame: level below 3x the predicted noise) the prediction cannot
    hold and the measured sky scatter is used instead; the measured scatter is not trusted when a
    sky is present because in crowded fields it includes the (static) unresolved stars.
    Without GAIN the measured sky variance is used, plus a source term with the gain estimated
    as sky level / sky variance when a sky is present.
    """
    bg = estimate_background(image, nodata)
    measured = bg.rms.astype(float) ** 2
    sky = measured
    source_term = 0.0
    if gain > 0:
        predicted = np.maximum(bg.level, 0) / gain + (read_noise_e / gain) ** 2
        level = float(np.median(bg.level[~nodata]))
        if level > 3.0 * np.sqrt(np.median(predicted[~nodata])):
            sky = predicted
        else:
            log.info("%s: sky level %.3g is below 3 sigma of the predicted noise (sky-subtracted?); using the "
                     "measured sky variance", source, level)
        source_term = np.maximum(image - bg.level, 0) / gain
    else:
        level = float(np.median(bg.level[~nodata]))
        sky_var = float(np.median(measured[~nodata]))
        if level > 3.0 * np.sqrt(sky_var):
            # A raw frame with its sky: Poisson statistics give the gain as sky / sky variance (an upper
            # bound when read noise matters), so sources still get their Poisson variance.
            gain_est = level / max(sky_var, 1e-30)
            log.info("%s: no GAIN; estimated %.3g e-/count from the sky level and scatter", source, gain_est)
            source_term = np.maximum(image - bg.level, 0) / gain_est
    variance = (sky + source_term).astype(np.float32)
    usable = ~nodata & np.isfinite(variance) & (variance > 0)
    fill = float(np.median(variance[usable])) if usable.any() else 1.0  # a noiseless image (e.g. a mask)
    variance[~usable] = fill
    return variance


def _apply_noise_map(exp: Exposure, path: Path) -> None:
    with _open(path) as hdul:
        sigma, _ = _first_image(hdul, path)
        sigma = np.array(sigma, dtype=np.float32)
    if sigma.shape != exp.shape:
        raise BadInputError(f"noise map shape {sigma.shape} differs from image shape {exp.shape}", path)
    good = np.isfinite(sigma) & (sigma > 0)
    if not good.any():
        raise BadInputError("noise map has no positive finite pixel", path)
    exp.variance = np.where(good, sigma.astype(np.float32) ** 2, np.median(sigma[good]) ** 2).astype(np.float32)
    exp.set_plane("NO_DATA", ~good)


def _apply_mask_file(exp: Exposure, path: Path) -> None:
    with _open(path) as hdul:
        m, _ = _first_image(hdul, path)
    if m.shape != exp.shape:
        raise BadInputError(f"mask shape {m.shape} differs from image shape {exp.shape}", path)
    exp.set_plane("BAD", np.asarray(m) != 0)


# --------------------------------------------------------------------------- PSF files


def read_psf(path: str | Path) -> Psf:
    """Read a PSF from a FITS file: a 2-d stamp (odd, positive sum) or a dialab PSF HDU."""
    path = Path(path)
    with _open(path) as hdul:
        if "PSF" in hdul:
            return _read_psf_hdus(hdul, path)
        data, _ = _first_image(hdul, path)
        return ImagePsf(np.array(data, dtype=float), source=path)


def _read_psf_hdus(hdul: fits.HDUList, path: Path) -> Psf:
    return _read_psf_model(hdul, path).with_aperture_correction(ApertureCorrection.from_header(hdul["PSF"].header))


def _read_psf_model(hdul: fits.HDUList, path: Path) -> Psf:
    hdu = hdul["PSF"]
    h = hdu.header
    model = h.get("PSFMODEL", "IMAGE")
    g1, g2 = h.get("PSF_G1", 0.0), h.get("PSF_G2", 0.0)
    if model == "GAUSSIAN":
        return GaussianPsf(g1=g1, g2=g2, sigma_pix=h["PSFSIGMA"])
    if model == "MOFFAT":
        return MoffatPsf(g1=g1, g2=g2, fwhm_pix=h["PSFFWHM"], beta=h["PSFBETA"])
    data = np.array(hdu.data, dtype=float)
    if data.ndim == 3:
        if "PSF_GRID" not in hdul:
            raise BadInputError("PSF cube without a PSF_GRID table", path)
        grid = hdul["PSF_GRID"].data
        try:
            return GridPsf(data, np.array(grid["x"]), np.array(grid["y"]))
        except BadInputError as exc:
            raise BadInputError(exc.problem, path) from None
    return ImagePsf(data, source=path)


def _psf_hdus(psf: Psf) -> list[fits.hdu.base.ExtensionHDU]:
    h = fits.Header()
    if psf.aperture_correction is not None:
        h.update(psf.aperture_correction.header_cards())
    if isinstance(psf, GridPsf):
        h["PSFMODEL"] = "GRID"
        cols = [fits.Column("x", "D", array=psf.xs), fits.Column("y", "D", array=psf.ys)]
        return [fits.ImageHDU(psf.stamps, h, name="PSF"),
                fits.BinTableHDU.from_columns(cols, name="PSF_GRID")]
    if isinstance(psf, GaussianPsf):
        h.update(PSFMODEL="GAUSSIAN", PSFSIGMA=psf.sigma_pix, PSF_G1=psf.g1, PSF_G2=psf.g2)
    elif isinstance(psf, MoffatPsf):
        h.update(PSFMODEL="MOFFAT", PSFFWHM=psf.fwhm_pix, PSFBETA=psf.beta, PSF_G1=psf.g1, PSF_G2=psf.g2)
    else:
        h["PSFMODEL"] = "IMAGE"
    return [fits.ImageHDU(psf.stamp(), h, name="PSF")]


# --------------------------------------------------------------------------- writing


#: How image planes are written. "none": plain. "lossless": tile-compressed without loss (RICE for the mask,
#: byte-shuffled GZIP for floats, which saves little on noise). "quantized": as LSST does, floats rounded to a
#: step tied to the noise, 1/``QUANTIZE_LEVEL`` of the typical pixel sigma (from the variance plane), stored as
#: RICE-compressed integers with BSCALE. Each pixel gains a rounding error of at most 1 / (q sqrt(12)) of its
#: noise (rms), so a PSF flux moves by that fraction of its error: 0.23% rms for q = 128 (under 1% for all but
#: 1 in 10^5); zeros stay exact, and the file is ~4x smaller. Without a usable noise (or with non-finite pixels)
#: cfitsio's per-tile noise estimate sets the step instead.
COMPRESSIONS = ("none", "lossless", "quantized")
QUANTIZE_LEVEL = 128.0


def image_hdu(data: np.ndarray, header: fits.Header | None = None, name: str | None = None,
              compression: str = "none", step: float | None = None, quantize_level: float = QUANTIZE_LEVEL):
    """An image HDU in one of ``COMPRESSIONS``; integers are always compressed without loss, floats quantized
    to ``step`` when given. Readers see an ordinary image either way (astropy and cfitsio decompress
    tile-compressed HDUs and apply BSCALE transparently)."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
    if compression == "none" or data.ndim not in (2, 3) or min(data.shape[-2:]) < 2 or data.size == 0:
        return fits.ImageHDU(data, header, name=name)
    # 16 rows a tile (a third of row-by-row's time to read back); a cube of stamps: one stamp a tile
    tiles = (min(16, data.shape[0]), data.shape[1]) if data.ndim == 2 else (1, *data.shape[1:])
    if np.issubdtype(data.dtype, np.integer):
        return fits.CompImageHDU(data, header, name=name, compression_type="RICE_1", tile_shape=tiles)
    if compression == "lossless":
        return fits.CompImageHDU(data, header, name=name, compression_type="GZIP_2", quantize_level=0.0,
                                 tile_shape=tiles)
    if step is not None and step > 0 and np.isfinite(data).all() and np.abs(data).max() / step < 2.0**31 - 2:
        hdu = fits.CompImageHDU(np.rint(data / np.float64(step)).astype(np.int32), header, name=name,
                                compression_type="RICE_1", tile_shape=tiles)
        hdu.header["BSCALE"] = float(step)
        hdu.header["BZERO"] = 0.0
        return hdu
    # the dither seed from the data's checksum: the same image always gives the same file (resumed runs verify it)
    return fits.CompImageHDU(data, header, name=name, compression_type="RICE_1", quantize_level=quantize_level,
                             quantize_method=2, dither_seed=-1, tile_shape=tiles)


def typical_noise(variance: np.ndarray) -> float:
    """The median pixel sigma of a variance plane (NaN when it has no positive value): the scale its image is
    quantized on."""
    sample = variance[:: max(1, variance.shape[0] // 256)]  # every few rows: a median needs no more
    positive = sample[np.isfinite(sample) & (sample > 0)]
    return float(np.sqrt(np.median(positive))) if positive.size else float("nan")


def write_exposure(exp: Exposure, path: str | Path, extra_hdus: list | None = None,
                   compression: str = "none", quantize_level: float = QUANTIZE_LEVEL) -> None:
    """Write an exposure in the multi-extension layout, atomically (a temporary name, then a rename).

    Parameters
    ----------
    exp : Exposure
        What to write (its PSF, when present, as a PSF HDU).
    path : str or Path
        The output file.
    extra_hdus : list of astropy.io.fits HDUs, optional
        Appended after the standard HDUs (e.g. the kernel image of a difference).
    compression : str
        One of ``COMPRESSIONS`` for the image, mask and variance planes (the mask is never quantized);
        ``quantize_level`` the quantization steps per noise sigma.
    """
    path = Path(path)
    primary = fits.Header()
    primary.update(exp.header)
    meta = {"VISIT": exp.visit, "DETECTOR": exp.detector, "BAND": exp.band, "MJD-OBS": exp.mjd,
            "EXPTIME": exp.exptime, "MAGZERO": exp.magzero, "GAIN": exp.gain, "SATURATE": exp.saturate}
    for k, v in meta.items():
        if isinstance(v, float) and not math.isfinite(v):
            continue  # FITS cannot hold NaN; absent means unknown
        primary[k] = v
    wcs_header = exp.wcs.to_header(relax=True) if exp.wcs is not None else fits.Header()
    mask_header = fits.Header()
    for name, bit in sorted(exp.mask_planes.bits.items(), key=lambda kv: kv[1]):
        mask_header[f"MP_{name}"[:8] if len(name) <= 5 else f"HIERARCH MP_{name}"] = bit
    sigma = typical_noise(exp.variance) if compression == "quantized" else float("nan")
    # variances to 1/(8q) of the typical one: errors of errors stay below 0.05%
    hdus = [fits.PrimaryHDU(header=primary),
            image_hdu(exp.image, wcs_header, "IMAGE", compression, sigma / quantize_level, quantize_level),
            image_hdu(exp.mask, mask_header, "MASK", compression),
            image_hdu(exp.variance, wcs_header, "VARIANCE", compression, sigma**2 / (8 * quantize_level),
                      quantize_level)]
    if exp.psf is not None:
        hdus += _psf_hdus(exp.psf)
    hdus += list(extra_hdus or [])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
    tmp.replace(path)
