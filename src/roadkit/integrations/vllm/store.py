"""An adapter store: adapters found by name in one directory, and compositions of them built on demand.

The server is started with `ROADKIT_ADAPTER_STORE=DIR`; a request's `model` then names an adapter
directory in DIR, or a composition of several, in this grammar (names: letters, digits, `_`, `-`, `.`,
starting with a letter or digit; at most 8 adapters):

    a                 the adapter DIR/a
    a+b+c             their union: adapters trained in disjoint subspaces, each pair from its owner
    a>b>c             sequential: a, then b, then c
    0.3*a+0.7*b       interpolation with those weights

A composition is exact RoAd math (`roadkit.composition`) and costs what one adapter costs: it is
built from the adapters' files in milliseconds, written to a private folder (never into the store),
and served like any adapter. Names that compose the same thing share one canonical name, so `b+a`
and `a+b` are one adapter: `canonical` sorts union and interpolation terms.

A composition reads its parts from the store when it is built. The server serves a name as it was when
first requested until the name is unloaded; after that, a composition is built again if one of its
parts' files changed since (`AdapterStore.resolve` compares their sizes and modification times).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ... import checkpoint as ckpt
from ...composition import SavedAdapter, compose_adapters
from ...config import CONFIG_NAME

STORE_ENV = "ROADKIT_ADAPTER_STORE"
NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}"
WEIGHT = r"[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
MAX_TERMS = 8
MAX_COMPOSED = 64  # compositions kept loaded (and their folders); the least recently requested goes first
MAX_ALIASES = 4 * MAX_COMPOSED  # other spellings of loaded compositions kept ("b+a" for "a+b")
GRAMMAR = (
    "an adapter name in the store (letters, digits, '_', '-', '.'), or a composition of up to "
    f"{MAX_TERMS}: 'a+b' (union of adapters in disjoint subspaces), 'a>b' (a, then b), "
    "'0.3*a+0.7*b' (interpolation; weights are numbers >= 0 such as 0.3, 1 or 2.5e-1)"
)
_NAME_RE = re.compile(NAME)
_TERM_RE = re.compile(rf"({WEIGHT})\*({NAME})")


class StoreError(ValueError):
    """A model name that is not in the grammar, names no adapter, or composes adapters that do not fit."""


class AdapterMissingError(StoreError):
    """A name in the grammar whose adapter is not in the store (answered with a 404)."""


@dataclass(frozen=True)
class Expression:
    """A parsed model name: `mode` None for one adapter, else a `roadkit.composition` mode."""

    mode: str | None
    names: tuple[str, ...]
    weights: tuple[float, ...] = ()

    @property
    def canonical(self) -> str:
        """The one name for this composition: union and interpolation terms sorted by name."""
        if self.mode is None:
            return self.names[0]
        if self.mode == "sequential":
            return ">".join(self.names)
        if self.mode == "union":
            return "+".join(sorted(self.names))
        terms = sorted(zip(self.names, self.weights, strict=True))
        return "+".join(f"{w!r}*{n}" for n, w in terms)


def looks_composed(name: str) -> bool:
    """Whether a model name tries the composition grammar (so a mistake in it deserves a 400, not a 404)."""
    return any(op in name for op in "+>*")


def parse(name: str) -> Expression:
    """The expression a model name stands for; raises `StoreError` with the grammar otherwise."""
    if _NAME_RE.fullmatch(name) and ".." not in name:
        return Expression(None, (name,))
    weights: tuple[float, ...] = ()
    if ">" in name and "+" not in name and "*" not in name:
        mode, parts = "sequential", name.split(">")
    elif "*" in name:
        terms = [_TERM_RE.fullmatch(t) for t in name.split("+")]
        if not all(terms):
            raise StoreError(f"model {name!r} is not a valid adapter composition; use {GRAMMAR}.")
        mode = "interpolate"
        parts = [t.group(2) for t in terms if t]
        weights = tuple(float(t.group(1)) for t in terms if t)
        if not all(math.isfinite(w) for w in weights):
            raise StoreError(f"model {name!r}: interpolation weights must be finite numbers.")
    elif "+" in name:
        mode, parts = "union", name.split("+")
    else:
        raise StoreError(f"model {name!r} is not a valid adapter name; use {GRAMMAR}.")
    if not all(_NAME_RE.fullmatch(p) and ".." not in p for p in parts) or len(parts) < 2:
        raise StoreError(f"model {name!r} is not a valid adapter composition; use {GRAMMAR}.")
    if len(parts) > MAX_TERMS:
        raise StoreError(f"model {name!r} composes {len(parts)} adapters; at most {MAX_TERMS}.")
    if mode != "sequential" and len(set(parts)) != len(parts):
        raise StoreError(f"model {name!r} names an adapter twice.")
    return Expression(mode, tuple(parts), weights)


class AdapterStore:
    """Adapters by name under `root`, and the compositions built from them (in a private folder)."""

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise NotADirectoryError(f"{STORE_ENV}={root!r} is not a directory.")
        self.root = os.path.realpath(root)
        self._composed: OrderedDict[str, tuple[str, tuple]] = OrderedDict()  # canonical name -> folder, parts' stamps
        self._lock = threading.Lock()
        self._private: str | None = None  # made on the first composition

    def directory(self, name: str) -> str:
        """The store's folder for adapter `name`: inside the store (links that lead out are refused)."""
        path = os.path.realpath(os.path.join(self.root, name))
        if os.path.commonpath([path, self.root]) != self.root or path == self.root:
            raise StoreError(f"adapter {name!r} is outside the adapter store.")
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            raise AdapterMissingError(f"adapter {name!r} is not in the adapter store.")
        return path

    def resolve(self, expression: Expression) -> str:
        """A folder holding the adapter `expression` stands for, composed now if needed."""
        if expression.mode is None:
            return self.directory(expression.names[0])
        canonical = expression.canonical
        stamps = self._stamps(expression)
        with self._lock:
            cached = self._composed.get(canonical)
            if cached is not None and cached[1] == stamps and os.path.isdir(cached[0]):
                self._composed.move_to_end(canonical)
                return cached[0]
        folder = self._compose(expression)
        with self._lock:
            old = self._composed.pop(canonical, None)
            if old is not None:  # built from parts that changed since; the name was unloaded, so it is unused
                shutil.rmtree(old[0], ignore_errors=True)
            self._composed[canonical] = (folder, stamps)
            while len(self._composed) > MAX_COMPOSED:
                shutil.rmtree(self._composed.popitem(last=False)[1][0], ignore_errors=True)
        return folder

    def _stamps(self, expression: Expression) -> tuple:
        """What identifies the parts' files as they are now: each file's name, size, modification time and inode."""
        stamps = []
        for name in sorted(set(expression.names)):  # every spelling of the composition has the same stamps
            directory = self.directory(name)
            with os.scandir(directory) as entries:
                files = sorted((e.name, e.stat()) for e in entries if e.is_file())
            stamps.append((directory, tuple((f, s.st_size, s.st_mtime_ns, s.st_ino) for f, s in files)))
        return tuple(stamps)

    def _compose(self, expression: Expression) -> str:
        inputs, fingerprints = [], []
        for name in expression.names:
            directory = self.directory(name)
            try:
                config, tensors = ckpt.read_adapter(directory)
            except (OSError, ValueError, TypeError) as err:
                raise StoreError(f"adapter {name!r} cannot be read: {err}") from err
            inputs.append(SavedAdapter(name, config, tensors))
            fingerprints.append(ckpt.read_base_fingerprint(directory))
        recorded = [f for f in fingerprints if f]
        shared = set.intersection(*(set(f) for f in recorded)) if recorded else set()
        if any(ckpt.fingerprint_differs(recorded[0][p], torch.tensor(f[p])) for f in recorded[1:] for p in shared):
            raise StoreError(f"the adapters of {expression.canonical!r} were trained on different base models.")
        try:
            config, tensors = compose_adapters(inputs, expression.mode or "union", expression.weights or None)
        except ValueError as err:
            raise StoreError(f"{expression.canonical!r} cannot be composed: {err}") from err
        with self._lock:
            if self._private is None:
                self._private = tempfile.mkdtemp(prefix="roadkit-compositions-")
                weakref.finalize(self, shutil.rmtree, self._private, ignore_errors=True)
        folder = tempfile.mkdtemp(dir=self._private)
        ckpt.write_adapter(folder, config, tensors, recorded[0] if recorded else None)
        return folder
