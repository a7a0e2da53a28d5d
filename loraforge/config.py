"""Typed configuration. Parsed once at the edge (CLI / YAML / Python), then passed down as sections."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraforge.errors import ConfigError

ALL_LINEAR = "all-linear"


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    """One adapter's shape and placement: h = W0·x + s·B·A·dropout(x), s = alpha/r (alpha/√r with rsLoRA)."""

    r: int = Field(8, ge=1, description="Rank of the update B·A.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator; the update is multiplied by alpha/r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input (training only).")
    targets: list[str] | str = Field(
        ALL_LINEAR,
        description=(
            "Modules to adapt: a list of name suffixes (e.g. [q_proj, v_proj]), a regex matched against the full "
            "module name, or 'all-linear' (every Linear / GPT-2 Conv1D except the output head). An empty list "
            "adapts only target_parameters."
        ),
    )
    target_parameters: list[str] = Field(
        default_factory=list,
        description="Parameter paths to adapt directly, e.g. 'mlp.experts.gate_up_proj' for MoE experts stored "
        "as 3-D tensors (one LoRA per expert).",
    )
    layers_to_transform: list[int] | None = Field(None, description="Only adapt these layer indices.")
    layers_pattern: str | None = Field(
        None, description="Name of the layer list used by layers_to_transform (e.g. 'layers', 'h'); default: the "
        "first numbered path segment."
    )
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="Per-module rank by name suffix/regex.")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="Per-module alpha by name suffix/regex.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full as a copy per adapter (e.g. the lm_head)."
    )
    use_rslora: bool = Field(False, description="Scale by alpha/√r (rank-stabilised LoRA) instead of alpha/r.")
    init: Literal["kaiming", "gaussian"] = Field(
        "kaiming", description="Initialisation of A (B is always zero, so a fresh adapter equals the base)."
    )
    base_model_name_or_path: str | None = Field(None, description="Recorded in adapter_config.json.")

    @field_validator("targets")
    @classmethod
    def _targets_valid(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str) and value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regex: {exc}") from None
        return value


def parse_section(section: type[Section], values: dict, where: str = "config") -> Section:
    """Build a section from a plain dict, turning pydantic's errors into a ConfigError that names each key."""
    try:
        return section.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "<root>"
            problems.append(f"{where}.{key}: {error['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None
