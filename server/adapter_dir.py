"""``--adapter-dir``: the checkpoint folders a server may load on demand, by folder name.

Every folder directly under one of the directories is an adapter, served under its folder
name (a request's ``model``); the first directory that holds a name wins. A name must be a
plain folder name (no separator, no ``..``, not hidden), and a folder, or a file in it,
that is a symlink must resolve inside its directory: anything else is refused with the
reason, before a byte of it is read. The folders are looked up at each request, so a
checkpoint copied in later is served too.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from server.adapter_errors import AdapterRefused, ModelNotFoundError
from talan_serve.checkpoint import MANIFEST_NAME, CheckpointError, read_manifest
from talan_serve.config import CONFIG_NAME, TalanConfig, TalanConfigError

logger = logging.getLogger(__name__)

_SEPARATORS = ("/", "\\", "\0")
NAME_LIMIT = 255  # a folder name's length on common file systems


def check_name(name: str) -> None:
    """Refuse a ``model`` that is not a plain folder name (``AdapterRefused``)."""
    why = None
    if not name or len(name) > NAME_LIMIT:
        why = f"is empty or longer than {NAME_LIMIT} characters"
    elif any(sep in name for sep in _SEPARATORS):
        why = "holds a path separator"
    elif ".." in name:
        why = "holds '..'"
    elif name.startswith("."):
        why = "starts with '.' (a hidden folder)"
    if why is not None:
        raise AdapterRefused(f"adapter name {name!r} {why}: a model from --adapter-dir is "
                             "a plain folder name", reason="name", code="invalid_adapter_name")


def _inside(path: Path, root: Path) -> bool:
    resolved, top = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return resolved == top or top in resolved.parents


Holds = tuple[bool | None, bool | None]  # TALAN, LoRA (None: the manifest is unreadable)


@dataclass(frozen=True)
class DirectoryEntry:
    """One adapter folder: its name, its path under its directory, and that directory."""

    name: str
    path: Path
    root: Path

    def holds(self) -> Holds:
        """Whether it holds TALAN and a LoRA, as its manifest says (None: unreadable)."""
        try:
            manifest = read_manifest(self.path)
        except (CheckpointError, OSError):
            return None, None
        return bool(manifest.get("talan")), bool(manifest.get("adapter"))


@dataclass(frozen=True)
class StartConfig:
    """What an entry says of itself without reading tensors (for sizing at start)."""

    name: str
    config: TalanConfig | None
    lora_rank: int | None


class AdapterDirectory:
    """The ``--adapter-dir`` directories (module docstring)."""

    def __init__(self, roots: Sequence[str | Path]):
        self.roots = tuple(Path(root) for root in roots)
        # path -> (its manifest's stat, what it holds): a listing of many folders reads
        # only the manifests that changed since the last.
        self._holds: dict[Path, tuple[tuple[int, int, int], Holds]] = {}

    def listing(self, leave_out: set[str]) -> list[tuple[DirectoryEntry, Holds]]:
        """The entries there are now but those named in ``leave_out``, each with what it
        holds (``DirectoryEntry.holds``). Blocking: many folders take milliseconds."""
        listed: list[tuple[DirectoryEntry, Holds]] = []
        known: dict[Path, tuple[tuple[int, int, int], Holds]] = {}
        for entry in self.entries():
            if entry.name in leave_out:
                continue
            try:
                stat = (entry.path / MANIFEST_NAME).stat()
            except OSError:
                listed.append((entry, (None, None)))
                continue
            key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            cached = self._holds.get(entry.path)
            holds = cached[1] if cached is not None and cached[0] == key else entry.holds()
            known[entry.path] = (key, holds)
            listed.append((entry, holds))
        self._holds = known
        return listed

    def entry(self, name: str) -> DirectoryEntry:
        """The folder serving ``name``: ``AdapterRefused`` for a name or a symlink that is
        refused, ``ModelNotFoundError`` when no directory holds it."""
        check_name(name)
        for root in self.roots:
            path = root / name
            if not os.path.lexists(path):
                continue
            if not _inside(path, root):
                raise AdapterRefused(
                    f"adapter {name!r}: {path} is a symlink that leads out of {root} (to "
                    f"{os.path.realpath(path)})", reason="path", status=403,
                    code="adapter_path_not_allowed")
            if path.is_dir():
                return DirectoryEntry(name, path, root)
        raise ModelNotFoundError(f"The model '{name}' does not exist")

    def entries(self) -> Iterator[DirectoryEntry]:
        """The checkpoint folders there are now (a manifest, a plain name, inside their
        directory), once per name."""
        seen: set[str] = set()
        for root in self.roots:
            try:
                with os.scandir(root) as scan:
                    children = sorted(scan, key=lambda child: child.name)
            except OSError as error:
                logger.warning("--adapter-dir %s: %s", root, error)
                continue
            for child in children:
                name = child.name
                if name in seen or name.startswith("."):
                    continue
                path = root / name
                # Only a symlink can lead out: a plain child of a directory lies in it.
                if child.is_symlink() and not _inside(path, root):
                    continue
                if child.is_dir() and (path / MANIFEST_NAME).is_file():
                    seen.add(name)
                    yield DirectoryEntry(name, path, root)

    def start_configs(self) -> list[StartConfig]:
        """Each entry's TALAN config and LoRA rank as its JSON files give them (entries
        whose files do not parse are left to be refused at their first request)."""
        found = []
        for entry in self.entries():
            try:
                manifest = read_manifest(entry.path)
                config = TalanConfig.load(entry.path / CONFIG_NAME) \
                    if manifest.get("talan") else None
                rank = None
                if manifest.get("adapter"):
                    record = json.loads((entry.path / "adapter_config.json").read_text())
                    rank = int(max([record.get("r", 8),
                                    *(record.get("rank_pattern") or {}).values()]))
            except (CheckpointError, TalanConfigError, OSError, ValueError, TypeError):
                continue
            found.append(StartConfig(entry.name, config, rank))
        return found
