"""The vetting page: candidates and their cutouts, labels kept in the run, and a real browser driving it."""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dialab.analysis.runs import load_run
from dialab.cli import main
from dialab.pipeline.config import load_pipeline
from dialab.pipeline.runner import run_pipeline
from dialab.simulate.specs import get_spec
from dialab.simulate.survey import simulate_dataset
from dialab.vet.labels import LabelStore
from dialab.vet.server import create_app


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """One detector, one science visit per band, two flavors with fakes."""
    spec = get_spec("hsc-sprint-mini").model_copy(update={"shape": (768, 768), "detectors": [49],
                                                          "science_per_band": 1})
    root = tmp_path_factory.mktemp("vet")
    manifest = simulate_dataset(spec, root / "data", seed=3, progress=False)
    config = load_pipeline(overrides={"flavors": ["convolveTemplate", "preconvolution"],
                                      "inject": {"enabled": True, "min_per_detector": 30},
                                      "execution": {"workers": 2}})
    assert run_pipeline(manifest, config, root / "run", progress=False).ok
    return root / "run"


def test_labels_are_one_row_per_source_and_survive_a_new_store(tmp_path):
    store = LabelStore(tmp_path)
    store.put("auto", 11, "bogus")
    store.put("auto", 11, "real")  # a second look replaces the first
    store.put("zogy", 11, "skip")
    again = LabelStore(tmp_path).table()
    assert sorted(zip(again.flavor, again.diaSourceId, again.label)) == [("auto", 11, "real"), ("zogy", 11, "skip")]
    assert again.labelledAt.str.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d").all()
    with pytest.raises(ValueError, match="real, bogus, skip"):
        store.put("auto", 12, "maybe")
    assert store.export_csv(tmp_path / "labels.csv") == 2
    assert len(pd.read_csv(tmp_path / "labels.csv")) == 2


def test_candidate_filters_partition_the_run_and_cutouts_show_the_source(small_run):
    client = create_app(small_run).test_client()
    meta = client.get("/api/meta").get_json()
    flavors = load_run(small_run)
    assert meta["candidates"] == sum(len(fr.sources) for fr in flavors) > 0
    assert meta["difference_names"]["preconvolution"].startswith("score")

    def total(**query):
        return client.get("/api/candidates", query_string={**query, "limit": 1}).get_json()["total"]

    assert total(quality="good") + total(quality="flagged") == meta["candidates"]
    assert sum(total(kind=k) for k in meta["kinds"]) == meta["candidates"]
    for fr in flavors:  # every matched science fake is a "fake" candidate of its flavor
        science_fakes = fr.fakes[(fr.fakes.diaSourceId > 0) & (fr.fakes.target != "template")]
        assert total(flavor=fr.label, kind="fake") == len(science_fakes)
    # the brightest found fake: its difference stamp peaks at the centre
    rows = client.get("/api/candidates", query_string={"flavor": "convolveTemplate", "kind": "fake",
                                                       "limit": 200}).get_json()["rows"]
    bright = max(rows, key=lambda r: r["snr"])
    reply = client.get(f"/cutout/convolveTemplate/{bright['diaSourceId']}.png")
    assert reply.status_code == 200 and reply.mimetype == "image/png"
    image = np.asarray(Image.open(__import__("io").BytesIO(reply.data)).convert("L"), float)
    zoom = image.shape[0] // 51
    assert image.shape == (51 * zoom, 3 * 51 * zoom + 2 * 2 * zoom)
    difference = image[:, 2 * (51 + 2) * zoom :]
    centre = difference[20 * zoom : 31 * zoom, 20 * zoom : 31 * zoom].mean()
    assert centre > difference.mean() + 40  # a bright source in the middle of the difference panel
    assert client.get("/cutout/convolveTemplate/1.png").status_code == 404


def test_label_requests_are_checked_and_stored(small_run):
    client = create_app(small_run).test_client()
    row = client.get("/api/candidates", query_string={"limit": 1}).get_json()["rows"][0]
    bad = client.post("/api/labels", json={"flavor": row["flavor"], "diaSourceId": row["diaSourceId"], "label": "x"})
    assert bad.status_code == 400
    unknown = client.post("/api/labels", json={"flavor": row["flavor"], "diaSourceId": 1, "label": "real"})
    assert unknown.status_code == 404
    ok = client.post("/api/labels", json={"flavor": row["flavor"], "diaSourceId": row["diaSourceId"], "label": "bogus"})
    assert ok.status_code == 200
    assert client.get("/api/candidates", query_string={"label": "bogus"}).get_json()["total"] == 1
    csv = client.get("/labels.csv").data.decode()
    assert f"{row['flavor']},{row['diaSourceId']},bogus," in csv
    assert main(["vet", str(small_run), "--export-labels", str(small_run / "exported.csv")]) == 0
    assert pd.read_csv(small_run / "exported.csv").label.tolist() == ["bogus"]
    LabelStore(small_run).path.unlink()  # leave the run unlabelled for the browser test


def _chromium() -> str:
    path = os.environ.get("DIALAB_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must provide Chromium (DIALAB_TEST_CHROMIUM; .ci/run installs Debian's chromium)")
        pytest.skip("no Chromium here (install Debian's chromium, or set DIALAB_TEST_CHROMIUM)")
    return path


class _Server:
    """``dialab vet RUN --port 0`` as a real process; its address is read from its first line."""

    def __init__(self, run: Path, ignoring_sigint: bool = False):
        # ignoring_sigint: started as a non-interactive shell starts a background job, SIGINT ignored
        self.process = subprocess.Popen([sys.executable, "-m", "dialab.cli", "vet", str(run), "--port", "0"],
                                        stdout=subprocess.PIPE, text=True, preexec_fn=(lambda: signal.signal(
                                            signal.SIGINT, signal.SIG_IGN)) if ignoring_sigint else None)
        line = self.process.stdout.readline()
        match = re.search(r"http://[\d.]+:\d+/", line)
        assert match, f"no address in {line!r}"
        self.url = match.group(0)

    def stop(self, sig=signal.SIGINT):
        self.process.send_signal(sig)
        assert self.process.wait(timeout=20) == 0


def test_a_browser_lists_candidates_and_a_keypress_label_survives_a_restart(small_run, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    server = _Server(small_run)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server.url + "?flavor=convolveTemplate&kind=fake")
            page.wait_for_selector(".card img")
            cards = page.locator(".card")
            assert cards.count() > 0
            assert page.locator(".card.current").count() == 1
            page.wait_for_function("(() => { const i = document.querySelector('.card img'); "
                                   "return i.complete && i.naturalWidth === 3 * 51 * 3 + 2 * 2 * 3; })()")
            first_id = int(cards.nth(0).get_attribute("data-id"))
            second_id = int(cards.nth(1).get_attribute("data-id"))
            page.keyboard.press("r")  # label the selected (first) candidate real; the selection moves on
            page.wait_for_selector(f".card[data-id='{first_id}'] .label.real")
            page.keyboard.press("b")
            page.wait_for_selector(f".card[data-id='{second_id}'] .label.bogus")
            page.screenshot(path=str(tmp_path / "vet.png"))
            labels = LabelStore(small_run).table().set_index("diaSourceId").label.to_dict()
            assert labels == {first_id: "real", second_id: "bogus"}

            server.stop()
            server = _Server(small_run)  # a new process reads the labels from the run
            page.goto(server.url + "?label=real")
            page.wait_for_selector(".card")
            assert page.locator(".card").count() == 1
            assert int(page.locator(".card").nth(0).get_attribute("data-id")) == first_id
            assert page.locator(".card .label").nth(0).inner_text() == "real"
            browser.close()
    finally:
        server.stop()


def test_every_diaSource_has_a_reliability_and_the_shipped_model_keeps_bright_fakes(small_run):
    """This run (seed 3, 768 px) is not among those the shipped model was trained on."""
    flavors = load_run(small_run)
    for fr in flavors:
        src = fr.sources
        assert src.reliability.between(0, 1).all() and src.reliabilityVersion.notna().all()
        bright = fr.fakes[(fr.fakes.diaSourceId > 0) & (fr.fakes.expected_snr >= 8)]
        kept = src.set_index("diaSourceId").reliability.reindex(bright.diaSourceId) >= 0.5
        assert len(bright) >= 10 and kept.mean() >= 0.9, (fr.label, kept.mean())


def test_vetting_labels_override_the_truth_in_training(small_run):
    from dialab.analysis.reliability_training import training_table

    before = training_table([small_run])
    fake = before[before.kind == "fake"].iloc[0]
    unmatched = before[before.kind == "unmatched"].iloc[0]
    skipped = before[before.kind == "fake"].iloc[1]
    store = LabelStore(small_run)
    try:
        store.put(fake.flavor, fake.diaSourceId, "bogus")
        store.put(unmatched.flavor, unmatched.diaSourceId, "real")
        store.put(skipped.flavor, skipped.diaSourceId, "skip")
        after = training_table([small_run]).set_index(["flavor", "diaSourceId"])
    finally:
        store.path.unlink()
    assert after.loc[(fake.flavor, fake.diaSourceId), "label"] == 0
    assert after.loc[(unmatched.flavor, unmatched.diaSourceId), "label"] == 1
    assert (skipped.flavor, skipped.diaSourceId) not in after.index and len(after) == len(before) - 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_server_stops_cleanly_on_sigint_or_sigterm_even_started_as_a_background_job(small_run, sig):
    """A background job of a non-interactive shell inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt: the server, started so, stopped on neither signal (nor on SIGTERM ever, cleanly)."""
    from urllib.request import urlopen

    server = _Server(small_run, ignoring_sigint=True)
    with urlopen(server.url) as response:
        assert response.status == 200
    server.stop(sig)
