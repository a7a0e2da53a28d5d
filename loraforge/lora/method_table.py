"""Every adapter method loraforge has, by name and by PEFT's peft_type."""

from __future__ import annotations

from loraforge.errors import AdapterFileError
from loraforge.lora.adalora import METHOD as ADALORA
from loraforge.lora.loha import METHOD as LOHA
from loraforge.lora.lokr import METHOD as LOKR
from loraforge.lora.methods import LORA, Method

METHODS: dict[str, Method] = {m.name: m for m in (LORA, LOHA, LOKR, ADALORA)}


def method(name: str) -> Method:
    return METHODS[name]


def method_for_peft_type(peft_type: str, where: object) -> Method:
    for candidate in METHODS.values():
        if candidate.peft_type == peft_type:
            return candidate
    known = sorted(m.peft_type for m in METHODS.values())
    raise AdapterFileError(f"{where}: peft_type is {peft_type!r}; loraforge reads {known}")
