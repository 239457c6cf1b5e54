"""Locating the read-only shared data folder (``../shared`` next to the repository).

The shared folder holds the CIFAR-10 arrays and the pretrained checkpoints (see
``shared/README.md``). It is never copied into the repository; code finds it here, in this
order:

1. an explicit ``root`` argument (the command line's ``--shared`` option),
2. the environment variable ``CORA_SHARED``,
3. ``<repo root>/../shared``, the repo root being the parent of the ``cora`` package folder,
4. ``<cwd>/../shared``.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_VAR", "candidate_roots", "resolve_shared", "find_file", "find_glob"]

ENV_VAR = "CORA_SHARED"

_REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout, parent of the cora package folder


def candidate_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """Every shared-folder candidate, in priority order.

    An explicit root, or else ``CORA_SHARED``, comes alone: a folder the user named is never
    silently replaced by a default one.
    """
    if root is not None:
        return [Path(root).expanduser()]
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env).expanduser()]
    out: list[Path] = []
    out.append(_REPO_ROOT.parent / "shared")
    out.append(Path.cwd().parent / "shared")
    # Drop duplicates (the repo root is usually the cwd) but keep the order.
    seen: set[Path] = set()
    uniq = []
    for p in out:
        key = p.resolve() if p.exists() else p
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    return uniq


def resolve_shared(root: str | os.PathLike | None = None) -> Path:
    """The shared data folder.

    An explicit ``root`` (or ``CORA_SHARED``) is returned as given even if it does not exist,
    so that the later ``find_file`` error names the folder the user asked for. Without either,
    the first existing default is returned, or the repo-relative default if none exists.
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    defaults = [_REPO_ROOT.parent / "shared", Path.cwd().parent / "shared"]
    for p in defaults:
        if p.is_dir():
            return p
    return defaults[0]


def find_file(relpath: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Return the existing file ``relpath`` (e.g. ``"data/cifar10_test.npz"``).

    A path that already names an existing file (absolute, or relative to the cwd) is taken as
    it is. Otherwise ``relpath`` is looked up under each candidate shared folder (see
    :func:`candidate_roots`). Raises ``FileNotFoundError`` naming every place looked at.
    """
    direct = Path(relpath).expanduser()
    if direct.is_file():
        return direct
    looked = [direct] if direct.is_absolute() else []
    if not direct.is_absolute():
        looked.append(direct)  # relative to the cwd
        for base in candidate_roots(root):
            p = base / direct
            if p.is_file():
                return p
            looked.append(p)
    raise FileNotFoundError(_not_found_message(str(relpath), looked))


def find_glob(pattern: str, root: str | os.PathLike | None = None) -> Path:
    """The first file (sorted by name) matching ``pattern`` (e.g. ``"models/resnet20-*.th"``)
    under the first candidate shared folder that has a match; ``FileNotFoundError`` otherwise,
    naming every pattern tried."""
    looked = []
    for base in candidate_roots(root):
        hits = sorted(p for p in base.glob(pattern) if p.is_file())
        if hits:
            return hits[0]
        looked.append(base / pattern)
    raise FileNotFoundError(_not_found_message(pattern, looked))


def _not_found_message(what: str, looked: list[Path]) -> str:
    places = "\n".join(f"  - {p}" for p in looked)
    return (
        f"could not find {what!r}; looked in:\n{places}\n"
        f"Point to the shared folder with the --shared option (root=... in Python) "
        f"or the {ENV_VAR} environment variable."
    )
