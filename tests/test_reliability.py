"""The reliability score: its features on known shapes, the exported trees against scikit-learn, and the
shipped model on a run it never saw."""

import numpy as np
import pandas as pd
import pytest

from dialab.analysis.reliability_training import _export
from dialab.reliability import STAMP, features, load_model


def _gaussian(sigma=2.0, dx=0.0, dy=0.0, flux=2000.0):
    h = STAMP // 2
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    return flux * np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def test_stamp_features_tell_a_point_source_from_a_dipole_and_a_cosmic_ray():
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1, (3, 3, STAMP, STAMP))
    point = _gaussian()
    dipole = _gaussian(dx=1.0) - _gaussian(dx=-1.0)
    hit = np.zeros((STAMP, STAMP))
    hit[STAMP // 2, STAMP // 2] = 400.0
    triplets = noise.copy()
    for k, diff in enumerate((point, dipole, hit)):
        triplets[k, 2] += diff
    catalog = pd.DataFrame({"psfFlux": [1.0, 1.0, 1.0], "snr": [40.0, 10.0, 30.0]})
    f = features(catalog, triplets.astype(np.float32))
    assert f.core_negative_fraction[0] < 0.05 < 0.3 < f.core_negative_fraction[1]
    assert f.antisymmetry[0] < 0.2 < 0.8 < f.antisymmetry[1]
    assert f.peak_sharpness[2] > 0.8 > 0.2 > f.peak_sharpness[0]
    assert f.core_snr[0] == pytest.approx(point[22:29, 22:29].sum() / 7, rel=0.06)  # S/N of the core, noise 1
    assert set(f.columns) == set(load_model().feature_names)


def test_exported_trees_give_scikit_learns_decision_function():
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 5))
    x[rng.random(x.shape) < 0.1] = np.nan  # missing values take their learned side
    y = (np.nan_to_num(x[:, 0]) + 0.5 * np.nan_to_num(x[:, 1]) ** 2 + rng.normal(0, 0.5, 3000) > 0.5).astype(int)
    clf = HistGradientBoostingClassifier(max_iter=40, random_state=0).fit(x, y)
    calibration = IsotonicRegression(out_of_bounds="clip").fit([0.0, 1.0], [0.0, 1.0])
    model = _export(clf, list("abcde"), calibration, {})
    table = pd.DataFrame(x, columns=list("abcde"))
    np.testing.assert_allclose(model.raw_score(table), clf.decision_function(x), atol=1e-9)
    again = type(model).from_json(model.to_json())
    np.testing.assert_allclose(again.probability(table), clf.predict_proba(x)[:, 1], atol=1e-9)


def test_a_model_file_that_is_not_one_is_a_clear_error(tmp_path):
    from dialab.errors import BadInputError

    bad = tmp_path / "model.json"
    bad.write_text('{"version": 1}')
    with pytest.raises(BadInputError, match="not a dialab reliability model"):
        load_model(bad)
    shipped = load_model()
    assert 0 < len(shipped.version) <= 7  # the APDB's reliabilityVersion is VARCHAR(7) (PostgreSQL enforces it)
    shipped.version = "dialab-0.3.0"
    bad.write_text(shipped.to_json())
    with pytest.raises(BadInputError, match="1 to 7 characters"):
        load_model(bad)
