"""Finding a source's files inside ``data.path`` (or downloading them there) and loading them.

Every file name that comes from params (``data.files`` values, ``data.sha256`` keys) must stay
inside its folder: absolute names and ``..`` are refused before anything is joined, and the
resolved path is checked again.  A source file that is a symbolic link is followed only when
its target lies inside ``data.path`` (logged); a link pointing outside is refused.
"""
from __future__ import annotations

import logging
import urllib.parse
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

from stlink.data.download import check_digest, fetch
from stlink.data.sources.common import require_file
from stlink.data.sources.registry import Role, get_source
from stlink.errors import DataError
from stlink.io import sha256_file

if TYPE_CHECKING:
    from stlink.config import DataConfig
    from stlink.data.formats import RawData

log = logging.getLogger(__name__)


def safe_name(name: str, what: str) -> str:
    """``name`` when it is a relative path that cannot leave its folder; else a ``DataError``."""
    text = str(name)
    posix, windows = PurePosixPath(text), PureWindowsPath(text)
    if not text.strip() or posix.is_absolute() or windows.is_absolute() or windows.drive \
            or ".." in posix.parts or ".." in windows.parts:
        raise DataError(f"{what}: file name {text!r} must be a plain name inside the data folder "
                        "(no absolute path, no '..')")
    return text


def inside(path: Path, folder: Path, what: str) -> Path:
    """``path`` if it (links resolved) lies inside ``folder``; a link to elsewhere is refused."""
    real, root = path.resolve(), folder.resolve()
    if real != root and root not in real.parents:
        raise DataError(f"{path}: resolves to {real}, outside data.path {root}; refused ({what}: a link "
                        "out of the data folder is not followed; copy the file into it instead)")
    if path.is_symlink():
        log.warning("%s is a symbolic link to %s (inside data.path): reading the target", path, real)
    return path


def locate(source: str, folder: Path, files: dict[str, str]) -> dict[str, Path | None]:
    """Map each role of ``source`` to a file in ``folder``: ``files[role]`` if given, else a glob."""
    roles = get_source(source).roles
    unknown = sorted(set(files) - set(roles))
    if unknown:
        raise DataError(f"data.files: unknown role(s) {unknown} for source {source!r}; known: {sorted(roles)}")
    found: dict[str, Path | None] = {}
    taken: set[Path] = {folder / safe_name(name, f"data.files.{role}") for role, name in files.items()}
    for role, spec in roles.items():
        if role in files:
            path = folder / safe_name(files[role], f"data.files.{role}")
            found[role] = require_file(inside(path, folder, f"data.files.{role}"))
            continue
        found[role] = _glob_one(folder, role, spec, taken)
        if found[role] is not None:
            inside(found[role], folder, f"the {role!r} file")
            taken.add(found[role])
    return found


def _glob_one(folder: Path, role: str, spec: Role, taken: set[Path]) -> Path | None:
    """The one file matching the first pattern that matches any; several is an error."""
    for pattern in spec.patterns:
        hits = sorted(p for p in folder.glob(pattern) if p.is_file() and p not in taken)
        if spec.exclude:
            hits = [p for p in hits if spec.exclude not in p.name.lower()]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise DataError(f"{folder}: several files could be the {role!r} file "
                            f"{[p.name for p in hits]}; choose one with data.files.{role}")
    if spec.required:
        raise DataError(f"{folder}: no {role!r} file ({' or '.join(spec.patterns)}); "
                        f"name it with data.files.{role}")
    return None


def download_all(cfg: "DataConfig", folder: Path) -> None:
    """Fetch every file named in ``cfg.sha256`` / ``cfg.files`` from ``cfg.url`` into ``folder``."""
    names = list(dict.fromkeys([*cfg.files.values(), *cfg.sha256]))
    if not names:
        raise DataError(f"data.url={cfg.url}: list the files to download with their checksums "
                        f"in data.sha256 ({{file name: sha256}})")
    for name in names:
        safe_name(name, "data.sha256" if name in cfg.sha256 else "data.files")
    base = cfg.url.rstrip("/") + "/"
    for name in names:
        expected = cfg.sha256.get(name)
        target = folder / name
        if expected and target.is_file() and sha256_file(target) == expected.strip().lower():
            continue  # already here and intact
        fetch(base + urllib.parse.quote(name), target.parent, expected, name=target.name)


def load_source(cfg: "DataConfig") -> tuple["RawData", dict[str, Path]]:
    """Read the source ``cfg`` describes; returns the raw data and {file name: local path}.

    ``cfg.path`` is the folder of the source files (or one of them); with ``cfg.url`` the files
    are first downloaded into it (default ``data/download/<dataset>``).  Every file named in
    ``cfg.sha256`` is verified before parsing.
    """
    spec = get_source(cfg.source)
    if spec.generated:
        raise DataError(f"data.source={cfg.source} is generated ({spec.summary}), not loaded from files")
    for name in cfg.sha256:
        safe_name(name, "data.sha256")
    files = dict(cfg.files)
    if cfg.url:
        folder = Path(cfg.path) if cfg.path else Path("data/download") / cfg.dataset
        folder.mkdir(parents=True, exist_ok=True)
        download_all(cfg, folder)
    elif cfg.path:
        folder = Path(cfg.path)
        if folder.is_file():
            main = next(iter(spec.roles))
            files.setdefault(main, folder.name)
            folder = folder.parent
        elif not folder.is_dir():
            raise DataError(f"data.path={cfg.path}: no such file or folder")
    else:
        raise DataError(f"data.source={cfg.source}: set data.path (a folder) or data.url")
    located = locate(cfg.source, folder, files)
    names = {p.name for p in located.values() if p is not None}
    stray = sorted(set(cfg.sha256) - names)
    if stray:
        raise DataError(f"data.sha256 names {stray}, which are not among the source files {sorted(names)}")
    for path in located.values():
        if path is not None:
            check_digest(str(path), cfg.sha256.get(path.name), sha256_file(path))
    raw = spec.load(cfg, located)
    raw.meta["roles"] = {role: p.name for role, p in located.items() if p is not None}
    return raw, {p.name: p for p in located.values() if p is not None}


def source_fingerprint(cfg: "DataConfig") -> dict:
    """What the source is now, by content: {file name: sha256} of the files ``load_source`` would
    read (found the same way, nothing parsed); for a download the configured checksums; for a
    generated source its name.  Equal content gives an equal dict, so the DVC stage that writes
    it (always run) changes its output, and re-runs ``ingest``, only when a source file changed.
    """
    spec = get_source(cfg.source)
    if spec.generated:
        return {"source": cfg.source, "generated": True}
    if cfg.url:
        return {"source": cfg.source, "url": cfg.url, "sha256": dict(sorted(cfg.sha256.items()))}
    if not cfg.path:
        raise DataError(f"data.source={cfg.source}: set data.path (a folder) or data.url")
    folder, files = Path(cfg.path), dict(cfg.files)
    if folder.is_file():
        files.setdefault(next(iter(spec.roles)), folder.name)
        folder = folder.parent
    elif not folder.is_dir():
        raise DataError(f"data.path={cfg.path}: no such file or folder")
    located = locate(cfg.source, folder, files)
    return {"source": cfg.source,
            "files": {role: {"name": p.name, "sha256": sha256_file(p)} for role, p in located.items() if p is not None}}
