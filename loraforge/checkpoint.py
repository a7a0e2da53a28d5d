"""Training checkpoints that survive crashes: safetensors + JSON only, written aside and renamed.

A checkpoint folder `checkpoints/step-000123/` holds the adapter (PEFT format), the optimizer's
tensors, the RNG states and a JSON of everything else. It is written under a temporary name, gets a
COMPLETE marker last, and is then renamed into place: a crash at any moment leaves the previous
complete checkpoint as the newest one. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraforge.lora import LoraModel
from loraforge.lora.files import adapter_state, copy_adapter_tensors, read_adapter_files

MARKER = "COMPLETE"
PREFIX = "step-"


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{PREFIX}*") if (p / MARKER).exists())


def save_checkpoint(folder: Path, step: int, lora: LoraModel, optimizer: torch.optim.Optimizer,
                    scheduler, state: dict, keep: int) -> Path:
    final = folder / f"{PREFIX}{step:07d}"
    tmp = folder / f".tmp-{PREFIX}{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora.save(tmp, adapter_names=[next(iter(lora.configs))])
    optimizer_tensors, optimizer_meta = _flatten_optimizer(optimizer)
    save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    python_state = random.getstate()
    (tmp / "trainer_state.json").write_text(json.dumps({
        **state, "step": step, "optimizer": optimizer_meta, "scheduler": scheduler.state_dict(),
        "python_rng": [python_state[0], list(python_state[1]), python_state[2]],
    }, indent=1))
    (tmp / MARKER).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, lora: LoraModel, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNGs in place; returns the trainer state."""
    config, tensors = read_adapter_files(path)
    copy_adapter_tensors(adapter_state(lora, next(iter(lora.configs))), tensors, config, path)
    state = json.loads((path / "trainer_state.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                   state.pop("optimizer")))
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    full = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in full["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": full["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
