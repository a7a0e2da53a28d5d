"""lokr: not implemented yet (placeholder so that the method registry imports)."""

from __future__ import annotations

from loraforge.errors import AdapterError
from loraforge.lora.methods import Method


def _unsupported(*args, **kwargs):
    raise AdapterError("method=lokr is not implemented yet")


METHOD = Method("lokr", "LOKR", _unsupported, _unsupported, _unsupported)
