"""Which variants an adapter's config asks for, in the order their init runs (PiSSA moves W0's principal part into
A and B first; DoRA then measures ‖W0‖ as the magnitude's start)."""

from __future__ import annotations

from loraforge.config import LoraConfig
from loraforge.lora.dora import DoRA
from loraforge.lora.pissa import PiSSA
from loraforge.lora.variant import LoraVariant


def variants_for(config: LoraConfig) -> list[LoraVariant]:
    chosen: list[LoraVariant] = []
    if config.init.startswith("pissa"):
        chosen.append(PiSSA(config.init, config.use_rslora))
    if config.use_dora:
        chosen.append(DoRA())
    return chosen
