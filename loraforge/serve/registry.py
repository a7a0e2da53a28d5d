"""The adapters a server offers: folders under one root, named in requests, loaded on first use and kept
resident up to a limit, least recently used first out.

A name must match NAME_PATTERN and its folder (and the files in it) must resolve inside the root, so neither
`..`, an absolute path nor a symlink can reach other files. Adapters are read only from safetensors and every
tensor's shape is checked against the base model (`LoraModel.load_adapter`). An adapter in use by a running
request is never evicted.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import AdapterError, AdapterFileError
from loraforge.lora import LoraModel
from loraforge.lora.files import CONFIG_FILE, WEIGHTS_FILE

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class InvalidAdapterName(AdapterError):
    """The name is not a plain adapter name, or its folder leads outside the adapter root."""


class AdapterNotFound(AdapterError):
    """No adapter folder of that name under the root."""


class AdapterBusy(AdapterError):
    """Every resident adapter is in use, so none can make room; or an adapter in use cannot be unloaded."""


@dataclass
class _Resident:
    internal_name: str  # the name inside LoraModel, which allows no '.'
    users: int = 0


class AdapterRegistry:
    def __init__(self, lora: LoraModel, root: str | Path, max_adapters: int, model_lock: threading.Lock) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise AdapterNotFound(f"adapter folder {root} does not exist")
        if max_adapters < 1:
            raise AdapterError(f"max_adapters must be at least 1, got {max_adapters}")
        self.lora = lora
        self.root = root.resolve()
        self.max_adapters = max_adapters
        self._model_lock = model_lock  # held by the engine during every forward: the model changes only between
        self._lock = threading.Lock()
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self._ids = itertools.count()

    # -- names and folders -----------------------------------------------------------------------
    def available(self) -> list[str]:
        """Every adapter that `acquire` would find, by name."""
        names = []
        for entry in sorted(self.root.iterdir()):
            try:
                self.folder(entry.name)
            except AdapterError:
                continue
            names.append(entry.name)
        return names

    def folder(self, name: str) -> Path:
        """The adapter's folder, after checking the name and that nothing in it leads outside the root."""
        if not NAME_PATTERN.fullmatch(name):
            raise InvalidAdapterName(
                f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                "or digit"
            )
        folder = (self.root / name).resolve()
        if not folder.is_relative_to(self.root):
            raise InvalidAdapterName(f"adapter {name!r} resolves outside the adapter folder; refused")
        if not (folder / CONFIG_FILE).is_file():
            raise AdapterNotFound(f"model {name!r} not found: no such adapter in the adapter folder "
                                  "(GET /v1/models lists the models served)")
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            if (folder / file).exists() and not (folder / file).resolve().is_relative_to(self.root):
                raise InvalidAdapterName(f"adapter {name!r}: {file} resolves outside the adapter folder; refused")
        return folder

    # -- use ---------------------------------------------------------------------------------------
    def acquire(self, name: str) -> str:
        """Load the adapter if needed and pin it until `release`; returns its name inside the LoraModel."""
        with self._lock:
            entry = self._resident.get(name) or self._load(name)
            self._resident.move_to_end(name)
            entry.users += 1
            return entry.internal_name

    def release(self, name: str) -> None:
        with self._lock:
            self._resident[name].users -= 1

    def load(self, name: str) -> None:
        """Make the adapter resident now (the admin endpoint)."""
        self.acquire(name)
        self.release(name)

    def unload(self, name: str) -> None:
        with self._lock:
            entry = self._resident.get(name)
            if entry is None:
                raise AdapterNotFound(f"adapter {name!r} is not loaded")
            if entry.users:
                raise AdapterBusy(f"adapter {name!r} is in use by {entry.users} request(s); try again later")
            self._evict(name)

    def resident(self) -> dict[str, int]:
        """Loaded adapters, least recently used first, with how many requests use each now."""
        with self._lock:
            return {name: entry.users for name, entry in self._resident.items()}

    # -- under self._lock ----------------------------------------------------------------------
    def _load(self, name: str) -> _Resident:
        folder = self.folder(name)
        self._make_room()
        internal_name = f"served{next(self._ids)}"
        with self._model_lock:
            self.lora.load_adapter(folder, internal_name)
            self.lora.set_active([])  # rows pick their adapter per forward; the first loaded would become active
            try:
                _check_servable(self.lora, internal_name, name)
            except AdapterError:
                self.lora.delete_adapter(internal_name)
                raise
        entry = self._resident[name] = _Resident(internal_name)
        return entry

    def _make_room(self) -> None:
        while len(self._resident) >= self.max_adapters:
            idle = next((n for n, entry in self._resident.items() if not entry.users), None)
            if idle is None:
                raise AdapterBusy(
                    f"all {self.max_adapters} resident adapters are in use by running requests; retry later, or "
                    "start the server with a larger --max-adapters"
                )
            self._evict(idle)

    def _evict(self, name: str) -> None:
        entry = self._resident.pop(name)
        with self._model_lock:
            self.lora.delete_adapter(entry.internal_name)


def _check_servable(lora: LoraModel, internal_name: str, name: str) -> None:
    reason = lora.mixed_batch_refusal(internal_name)
    if reason:
        raise AdapterFileError(
            f"adapter {name!r} cannot be served in mixed-adapter batches: {reason}. Merge it into a model "
            "(`loraforge merge`) and serve that model instead"
        )
