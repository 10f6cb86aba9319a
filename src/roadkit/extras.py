"""Optional dependencies: which `pip install roadkit[EXTRA]` brings what a feature needs.

The core (`import roadkit`: config, layers, model, checkpoints, composition) needs torch and safetensors
only. Features that build on other libraries check for them first, so a missing one is one line naming
the install command, not a traceback from deep inside an import. The extras' contents are read from
roadkit's installed metadata, so pyproject.toml stays the one place they are written.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

from .errors import RoadkitError

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[([^\]]*)\])?")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


class MissingExtraError(RoadkitError, ImportError):
    """A feature's optional dependencies are not installed; the message names the `pip install`."""


def packages_of(extra: str) -> list[str]:
    """The distributions `roadkit[extra]` requires (following extras that name roadkit's other extras);
    empty when roadkit runs from a source tree without installed metadata."""
    try:
        requirements = importlib.metadata.requires("roadkit") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    found: list[str] = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if extra not in _EXTRA.findall(marker):
            continue
        match = _NAME.match(spec)
        if match is None:
            continue
        name, inner = match.groups()
        if name.lower() == "roadkit":
            found += [p for e in (inner or "").split(",") if e.strip() for p in packages_of(e.strip())]
        elif name not in found:
            found.append(name)
    return found


def _installed(distribution: str) -> bool:
    """Whether the distribution's top-level module can be imported (found without importing it)."""
    return importlib.util.find_spec(distribution.replace("-", "_")) is not None


def require(extra: str, feature: str) -> None:
    """Raise `MissingExtraError` ("<feature> needs a, b: pip install 'roadkit[extra]'") unless every
    distribution of `roadkit[extra]` is installed."""
    missing = [p for p in packages_of(extra) if not _installed(p)]
    if missing:
        raise MissingExtraError(f"{feature} needs {', '.join(missing)}: pip install 'roadkit[{extra}]'")
