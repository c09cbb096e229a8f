"""The dataset manifest (``dataset.yaml``): which science exposure goes with which template.

Paths are relative to the manifest. Every file is checked before anything runs, and all missing
files are named in one error.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import BadInputError

#: What a manifest may hold besides ``entries`` (the simulator records its spec, seed and truth tables).
MANIFEST_KEYS = {"entries", "name", "seed", "spec", "truth"}


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    visit: int = Field(ge=0)
    detector: int = Field(ge=0, lt=1000)
    band: str = Field(min_length=1)
    mjd: float = Field(allow_inf_nan=False)
    science: str
    template: str
    science_psf: str | None = None
    template_psf: str | None = None
    science_noise: str | None = None
    template_noise: str | None = None

    def files(self) -> dict[str, str]:
        keys = ("science", "template", "science_psf", "template_psf", "science_noise", "template_noise")
        return {k: getattr(self, k) for k in keys if getattr(self, k)}


@dataclass
class Manifest:
    path: Path
    name: str
    entries: list[Entry]
    truth: dict[str, str]
    sha256: str

    @property
    def root(self) -> Path:
        return self.path.parent

    def resolve(self, relative: str | None) -> str | None:
        return None if relative is None else str((self.root / relative).resolve())


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise BadInputError("manifest not found", path) from None
    except IsADirectoryError:
        raise BadInputError("is a folder; give its dataset.yaml", path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadInputError(f"not valid YAML ({str(exc).splitlines()[0]})", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list) or not data["entries"]:
        raise BadInputError("a manifest needs a non-empty `entries` list", path)
    unknown = sorted(set(data) - MANIFEST_KEYS)
    if unknown:
        raise BadInputError(f"unknown top-level key(s) {', '.join(unknown)} (known: {', '.join(sorted(MANIFEST_KEYS))})",
                            path)
    entries = []
    for i, raw in enumerate(data["entries"]):
        try:
            entries.append(Entry.model_validate(raw))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise BadInputError(f"entries[{i}].{where}: {err['msg']}", path) from None
    keys = [(e.visit, e.detector) for e in entries]
    if len(set(keys)) != len(keys):
        raise BadInputError("the same (visit, detector) appears twice", path)
    missing = sorted({rel for e in entries for rel in e.files().values() if not (path.parent / rel).is_file()})
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise BadInputError(f"{len(missing)} file(s) listed but missing: {shown}", path)
    return Manifest(path=path, name=str(data.get("name", path.parent.name)), entries=entries,
                    truth=dict(data.get("truth") or {}), sha256=hashlib.sha256(text).hexdigest())
