"""Sky geometry against exact spherical trigonometry, at the poles and across RA 0/360."""

import numpy as np
import pytest

from dialab.apdb import sky_polygon
from dialab.association import match_to_objects
from dialab.sky import from_tangent, mean_position, running_mean, separation_arcsec, tangent_offsets

ARCSEC = 1 / 3600


def _vincenty_arcsec(ra1, dec1, ra2, dec2):
    a1, d1, a2, d2 = map(np.deg2rad, (ra1, dec1, ra2, dec2))
    da = a2 - a1
    num = np.hypot(np.cos(d2) * np.sin(da), np.cos(d1) * np.sin(d2) - np.sin(d1) * np.cos(d2) * np.cos(da))
    return np.rad2deg(np.arctan2(num, np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(da))) * 3600


@pytest.mark.parametrize("ra0,dec0", [(0.0, 0.0), (359.9999, 10.0), (123.0, 89.9995), (200.0, -89.9999)])
def test_tangent_offsets_roundtrip_and_distances(ra0, dec0):
    rng = np.random.default_rng(3)
    xi, eta = rng.uniform(-30, 30, 50), rng.uniform(-30, 30, 50)  # arcsec
    ra, dec = from_tangent(xi, eta, ra0, dec0)
    back_xi, back_eta = tangent_offsets(ra, dec, ra0, dec0)
    np.testing.assert_allclose(back_xi, xi, atol=1e-6)
    np.testing.assert_allclose(back_eta, eta, atol=1e-6)
    # on a 30" field the gnomonic radius equals the great-circle distance to 1e-8 relative
    np.testing.assert_allclose(separation_arcsec(ra, dec, ra0, dec0), np.hypot(xi, eta), rtol=1e-7)
    np.testing.assert_allclose(separation_arcsec(ra, dec, ra0, dec0), _vincenty_arcsec(ra, dec, ra0, dec0),
                               atol=1e-6)


def test_means_across_ra_zero_and_at_the_pole():
    ra, dec = mean_position([359.9999, 0.0001], [5.0, 5.0])
    assert separation_arcsec(ra, dec, 0.0, 5.0)[0] < 1e-6
    ra, dec = mean_position([0.0, 90.0, 180.0, 270.0], [89.999, 89.999, 89.999, 89.999])
    assert dec == pytest.approx(90.0, abs=1e-9)
    ra, dec = running_mean([359.99995], [-30.0], [3], [0.00015], [-30.0])
    assert separation_arcsec(ra, dec, 0.0, -30.0)[0] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("ra0,dec0", [(0.0, 20.0), (10.0, 89.9998), (0.0, -89.9997)])
def test_association_matches_on_the_sphere(ra0, dec0):
    # objects 0.5" and 3" from two sources, placed by true sky offsets (east, north)
    src = from_tangent(np.array([0.0, 10.0]), np.array([0.0, 0.0]), ra0, dec0)
    obj = from_tangent(np.array([10.0, 0.5]), np.array([3.0, 0.0]), ra0, dec0)
    match = match_to_objects(*src, *obj, 1.0)
    assert list(match) == [1, -1]


def test_padded_region_holds_points_across_ra_zero_and_the_pole():
    lsst = pytest.importorskip("lsst.sphgeom")
    for ra0, dec0 in [(0.0, 0.0), (45.0, 89.99)]:
        corners = from_tangent(np.array([-60, 60, 60, -60.0]), np.array([-60, -60, 60, 60.0]), ra0, dec0)
        region = sky_polygon(*corners, pad_arcsec=10.0)
        inside = from_tangent(np.array([65.0, -65.0, 0.0]), np.array([0.0, 65.0, -65.0]), ra0, dec0)
        outside = from_tangent(np.array([80.0, -80.0]), np.array([0.0, 0.0]), ra0, dec0)
        for a, d in zip(*inside):
            assert region.contains(lsst.UnitVector3d(lsst.LonLat.fromDegrees(a, d)))
        for a, d in zip(*outside):
            assert not region.contains(lsst.UnitVector3d(lsst.LonLat.fromDegrees(a, d)))
