"""The vetting page's web application (Flask): candidates as JSON, their cutouts as PNG, labels stored in
the run. Loopback by default: the page writes to the run folder and has no accounts."""

from __future__ import annotations

import io
import logging
import signal
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
from flask import Flask, Response, abort, jsonify, request, send_from_directory

from ..analysis.images import difference_name, unit_stamps
from ..analysis.runs import FlavorRun, load_run
from .candidates import candidate_table
from .labels import LABELS, LabelStore

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PAGE_SIZE_MAX = 200
#: Units whose stamps stay in memory (consecutive candidates come from the same unit).
CACHED_UNITS = 8


def stamp_png(triplet: np.ndarray, zoom: int = 3, gap: int = 2) -> bytes:
    """Template, science and difference side by side, each on its own zscale, ``zoom`` x nearest-neighbour;
    pixels off the image (NaN) in dark blue."""
    from astropy.visualization import ZScaleInterval
    from PIL import Image

    panels = []
    for stamp in triplet:
        finite = stamp[np.isfinite(stamp)]
        lo, hi = ZScaleInterval().get_limits(finite) if finite.size > 1 else (0.0, 1.0)
        grey = np.clip((stamp - lo) / max(hi - lo, 1e-30), 0, 1) * 255
        rgb = np.repeat(np.nan_to_num(grey, nan=0)[..., None], 3, axis=2).astype(np.uint8)
        rgb[~np.isfinite(stamp)] = (20, 30, 90)
        panels.append(rgb[::-1])  # row 0 at the bottom, as in the figures
        panels.append(np.full((stamp.shape[0], gap, 3), 255, np.uint8))
    image = np.concatenate(panels[:-1], axis=1).repeat(zoom, axis=0).repeat(zoom, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class _StampCache:
    """The stamps of the last ``CACHED_UNITS`` units; one lock, so a unit's images are prepared once."""

    def __init__(self, runs: dict[str, FlavorRun]):
        self.runs = runs
        self.units: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def triplet(self, row: pd.Series) -> np.ndarray | None:
        key = (row.flavor, row.visit, row.detector)
        with self.lock:
            if key not in self.units:
                unit = pd.Series({"band": row.band, "visit": row.visit, "detector": row.detector, "mjd": row.mjd})
                self.units[key] = unit_stamps(self.runs[row.flavor], unit)
                while len(self.units) > CACHED_UNITS:
                    self.units.popitem(last=False)
            self.units.move_to_end(key)
            return self.units[key].of_source(int(row.diaSourceId))


def _filtered(table: pd.DataFrame, labels: pd.DataFrame, args) -> pd.DataFrame:
    """Candidates passing the page's filters (flavor, band, quality, kind, label, min reliability)."""
    keep = pd.Series(True, index=table.index)
    for column in ("flavor", "band", "kind"):
        if args.get(column):
            keep &= table[column].astype(str) == args[column]
    quality = args.get("quality")
    if quality in ("good", "flagged"):
        keep &= table.good == (quality == "good")
    if args.get("min_reliability"):
        keep &= table.reliability.fillna(-1) >= float(args["min_reliability"])
    label = args.get("label")
    if label:
        given = table[["flavor", "diaSourceId"]].merge(labels, on=["flavor", "diaSourceId"], how="left").label
        keep &= (given.isna() if label == "unlabelled" else given == label).to_numpy()
    return table[keep]


def create_app(run: str | Path) -> Flask:
    """The application for one run folder (read once; labels read on each request)."""
    run = Path(run)
    runs = {fr.label: fr for fr in load_run(run)}
    table = candidate_table(list(runs.values()))
    store = LabelStore(run)
    stamps = _StampCache(runs)
    app = Flask(__name__, static_folder=None)

    @app.get("/")
    def page():
        return send_from_directory(STATIC, "index.html")

    @app.get("/static/<path:name>")
    def static_file(name):
        return send_from_directory(STATIC, name)

    @app.get("/api/meta")
    def meta():
        return jsonify(run=str(run), flavors=sorted(runs), bands=sorted(table.band.dropna().astype(str).unique()),
                       kinds=sorted(table.kind.unique()), labels=list(LABELS), candidates=len(table),
                       has_reliability=bool(table.reliability.notna().any()),
                       difference_names={f: difference_name(fr.flavor) for f, fr in runs.items()})

    @app.get("/api/candidates")
    def candidates():
        labels = store.table()
        chosen = _filtered(table, labels, request.args)
        offset = max(int(request.args.get("offset", 0)), 0)
        limit = min(max(int(request.args.get("limit", 48)), 1), PAGE_SIZE_MAX)
        page = chosen.iloc[offset : offset + limit].merge(labels, on=["flavor", "diaSourceId"], how="left")
        page = page.astype(object).where(page.notna(), None)
        return jsonify(total=len(chosen), offset=offset, rows=page.to_dict(orient="records"))

    @app.get("/cutout/<flavor>/<int:dia_source_id>.png")
    def cutout(flavor, dia_source_id):
        rows = table[(table.flavor == flavor) & (table.diaSourceId == dia_source_id)]
        if rows.empty:
            abort(404)
        try:
            triplet = stamps.triplet(rows.iloc[0])
        except OSError as exc:
            log.warning("no cutout for %s %d: %s", flavor, dia_source_id, exc)
            abort(404)
        if triplet is None:
            abort(404)
        return Response(stamp_png(triplet), mimetype="image/png", headers={"Cache-Control": "max-age=86400"})

    @app.post("/api/labels")
    def put_label():
        body = request.get_json(silent=True) or {}
        flavor, label = body.get("flavor"), body.get("label")
        try:
            dia_source_id = int(body.get("diaSourceId"))
        except (TypeError, ValueError):
            return jsonify(error="diaSourceId must be an integer"), 400
        if label not in LABELS:
            return jsonify(error=f"label must be one of {', '.join(LABELS)}"), 400
        if not ((table.flavor == flavor) & (table.diaSourceId == dia_source_id)).any():
            return jsonify(error=f"no diaSource {dia_source_id} in flavor {flavor}"), 404
        when = store.put(flavor, dia_source_id, label)
        return jsonify(flavor=flavor, diaSourceId=dia_source_id, label=label, labelledAt=when)

    @app.get("/labels.csv")
    def labels_csv():
        return Response(store.table().to_csv(index=False), mimetype="text/csv",
                        headers={"Content-Disposition": "attachment; filename=labels.csv"})

    return app


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8765, announce=print) -> None:
    """Serve the page until interrupted; ``port`` 0 picks a free one. ``announce`` gets the page's address."""
    from werkzeug.serving import make_server

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach it can read the run and write its labels", host)
    if not log.isEnabledFor(logging.INFO):  # one line per request only with -v
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server(host, port, create_app(run), threaded=True)
    announce(f"dialab vet: http://{host}:{server.server_port}/ (labels in {Path(run) / 'labels.sqlite'}; "
             "Ctrl-C to stop)")
    previous = _stop_on_signals()
    try:
        server.serve_forever()
    finally:
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_on_signals() -> dict:
    """Ctrl-C and SIGTERM (a service manager's stop) end the server cleanly, even where SIGINT was inherited as
    ignored (a background job of a non-interactive shell, where Python installs no KeyboardInterrupt); the
    previous handlers are returned for restoring."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(signum, frame):
        raise KeyboardInterrupt

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
