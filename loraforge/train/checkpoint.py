"""Training checkpoints that survive crashes and power loss: safetensors + JSON only, never a pickle.

`checkpoints/step-0000123/` holds what trains (`trainee.safetensors`: the adapter's live tensors and its method
controller's state, or every weight of a full fine-tune), the optimizer's tensors, the RNG states,
`trainer_state.json` (the typed TrainingState, the optimizer's and scheduler's settings, Python's RNG) and, for an
adapter, the adapter in PEFT's format (so `loraforge chat --adapter run/checkpoints/step-N` works). The folder is
built under a temporary name; `COMPLETE`, written last, lists every file's sha256; then every file and the folder
are fsynced and the folder is renamed into place. On resume a checkpoint whose files do not match its list
(truncated, a flipped byte) is skipped with a warning and the one before it is used.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loraforge.atomic import file_sha256, fsync_path, write_folder
from loraforge.train.state import TrainingState
from loraforge.train.trainee import AdapterTrainee, Trainee

STAGE_FILE = "stage.safetensors"
MARKER = "COMPLETE"
PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints with a COMPLETE marker, oldest first (not yet verified: see verify_checkpoint)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{PREFIX}*") if (p / MARKER).exists())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # On CPU and contiguous; clone() parts tensors that share storage, which safetensors refuses.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))


def save_checkpoint(folder: Path, trainee: Trainee, optimizer: torch.optim.Optimizer, scheduler,
                    state: TrainingState, keep: int, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the checkpoint of `state.step`, then drop all but the newest `keep`. A failure (a full disk) leaves
    no partial folder and every earlier checkpoint as it was. `extra`: a stage's own tensors (GRPO's current
    rollout batch), given back by load_checkpoint."""
    final = write_checkpoint(folder / checkpoint_name(state.step), trainee, optimizer, scheduler, state, extra)
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(folder)
    return final


def write_checkpoint(final: Path, trainee: Trainee, optimizer: torch.optim.Optimizer, scheduler,
                     state: TrainingState, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """One checkpoint folder at `final`, built aside and renamed into place once complete."""

    def fill(tmp: Path) -> None:
        _save_tensors(trainee.checkpoint_tensors(), tmp / "trainee.safetensors")
        optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer)
        _save_tensors(optimizer_tensors, tmp / "optimizer.safetensors")
        if extra:
            _save_tensors(extra, tmp / STAGE_FILE)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        _save_tensors(rng, tmp / "rng.safetensors")
        if isinstance(trainee, AdapterTrainee):
            trainee.save(tmp)  # the PEFT-format adapter, for people; resume reads trainee.safetensors
        version, internal, gauss = random.getstate()
        (tmp / "trainer_state.json").write_text(json.dumps({
            "state": state.to_dict(), "optimizer": optimizer_meta, "scheduler": scheduler.state_dict(),
            "python_rng": [version, list(internal), gauss]}, indent=1))
        manifest = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MARKER).write_text(json.dumps(manifest, indent=1))  # last: it lists every other file

    write_folder(final, fill)
    return final


def stage_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The stage's own tensors of a checkpoint (empty when it saved none)."""
    file = path / STAGE_FILE
    return load_file(str(file)) if file.is_file() else {}


def verify_checkpoint(path: Path) -> str | None:
    """None when every file matches the COMPLETE list, else what is wrong."""
    try:
        manifest = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as error:
        return f"unreadable {MARKER} ({error})"
    if not isinstance(manifest, dict) or "trainer_state.json" not in manifest:
        return f"{MARKER} lists no files (written by an older loraforge?)"
    for name, digest in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file_sha256(file) != digest:
            return f"{name} does not match its checksum (truncated or corrupted)"
    return None


def load_checkpoint(path: Path, trainee: Trainee, optimizer: torch.optim.Optimizer, scheduler,
                    restore_optimizer: bool = True) -> TrainingState:
    """Restore what trains, the optimizer, the scheduler and the RNGs in place; returns the training state.
    restore_optimizer=False for a run that is already over (an AdaLoRA adapter pruned at its last step no longer
    has the shapes the optimizer state was made for)."""
    saved = json.loads((path / "trainer_state.json").read_text())
    try:
        trainee.load_checkpoint_tensors(load_file(str(path / "trainee.safetensors")), path)
        if restore_optimizer:
            optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                           saved["optimizer"]))
        rng = load_file(str(path / "rng.safetensors"))
    except SafetensorError as error:
        raise ValueError(f"{path}: {error}") from None
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    version, internal, gauss = saved["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return TrainingState.from_dict(saved["state"])


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    full = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in full["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": full["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
