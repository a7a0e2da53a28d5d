"""What a training run knows besides its tensors: where it is, and what it has seen. Checkpointed whole."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class TrainingState:
    step: int = 0  # optimizer steps taken
    consumed: int = 0  # training examples drawn so far: the position in the seeded data order
    best_val_loss: float | None = None  # of the adapter in best/
    last_val_loss: float | None = None
    last_val_step: int | None = None  # the step last_val_loss belongs to
    evals_without_improvement: int = 0
    bad_in_row: int = 0  # NaN/inf steps in a row
    skipped_steps: int = 0
    # Training's own log-loss over the first epoch (steps that started inside it): the dataset's information,
    # as the capacity advisor counts it, measured without a pass of its own.
    first_epoch_nats: float = 0.0
    first_epoch_targets: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainingState:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training state keys {unknown}")
        return cls(**values)
