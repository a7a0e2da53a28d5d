"""The run folder: creates a new run, refuses to mix with another, or resumes the same one. Owns the layout.

    output/
      run.json            the fingerprint: base model, data files' sha256, every key that changes the result
      config.yaml  data/  data_report.json
      checkpoints/        step-NNNNNNN/ (see checkpoint.py)
      adapter/  best/     the last and the best adapter (finetune=full: model/ and best/ whole models)
      metrics.jsonl  tensorboard/  learning_curve.png  summary.json

A fresh run into a folder that holds a run refuses (resume=true continues it; overwrite=true moves it aside to
`output.old-YYYYmmdd-HHMMSS`, never deletes). resume=true compares the fingerprint and refuses with the list of
differences; the keys in RESUMABLE_KEYS may change and are said.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from loraforge.atomic import file_sha256, recover_folder, write_text
from loraforge.config import TrainConfig, config_to_yaml
from loraforge.data import require_data_file
from loraforge.demo import default_data
from loraforge.errors import ConfigError
from loraforge.models import DEFAULT_MODEL, is_default_model, resolve_model_path
from loraforge.train.checkpoint import complete_checkpoints, verify_checkpoint
from loraforge.train.stage import examples_per_step

FINGERPRINT_FILE = "run.json"
# Names whose presence means "a run lives here".
RUN_FILES = (FINGERPRINT_FILE, "config.yaml", "checkpoints", "adapter", "model", "best", "metrics.jsonl")
# Keys that may change when a run resumes: how long it runs, how often it evaluates and saves, what happens
# after training, where it is and how it reports. Everything else changes the result, so it must match.
RESUMABLE_KEYS = {"max_steps", "epochs", "eval_every", "val_samples", "save_every", "patience", "keep_checkpoints",
                  "max_bad_steps", "output", "resume", "overwrite", "compare", "compare_samples", "compare_cache",
                  "max_new_tokens", "eval_metrics", "report", "tensorboard", "device", "compact_cpu_memory",
                  "distributed",
                  # how a step's examples are split into micro-batches and processes: examples_per_step must match
                  "grad_accum"}


def _model_identity(name: str) -> dict:
    """The base model as files: the embedded default by name; a folder by its config and weight files' sizes
    (hashing gigabytes of weights on every start would cost more than it protects)."""
    if is_default_model(name):
        return {"model": DEFAULT_MODEL}
    folder = resolve_model_path(name)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".bin")}
    config = folder / "config.json"
    return {"model": str(folder.resolve()), "config.json": file_sha256(config) if config.exists() else None,
            "weights": files}


DATA_KEYS = {"train": "data.path", "validation": "data.validation_path", "test": "data.test_path"}


def fingerprint(config: TrainConfig) -> dict:
    """What makes a run this run: the base model, the data files' contents and every result-changing key."""
    data = config.data
    files = {"train": data.path or default_data(config.stage), "validation": data.validation_path, "test": data.test_path}
    for role, path in files.items():  # before hashing them: a missing file is the user's, named by its key
        if path is not None:
            require_data_file(Path(path), DATA_KEYS[role])
    values = config.model_dump(mode="json")
    return {
        "base": _model_identity(config.model),
        "data": {role: file_sha256(Path(path)) for role, path in files.items() if path is not None},
        "config": {key: value for key, value in values.items() if key not in RESUMABLE_KEYS},
        # The step's examples over all processes: a run may resume on another number of processes (or with
        # another grad_accum) as long as each step trains on the same examples.
        "examples_per_step": examples_per_step(config),
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    lines = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} → {b!r}")
    return lines


@dataclass
class RunFolder:
    root: Path

    # -- the layout ------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def best(self) -> Path:
        return self.root / "best"

    def last(self, full: bool) -> Path:
        return self.root / ("model" if full else "adapter")

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def learning_curve(self) -> Path:
        return self.root / "learning_curve.png"

    def holds_a_run(self) -> bool:
        return any((self.root / name).exists() for name in RUN_FILES)

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, config: TrainConfig, say: Callable[[str], None]) -> tuple[RunFolder, Path | None]:
        """The run folder for `config`, and the checkpoint to resume from (None: start at step 0)."""
        folder = cls(Path(config.output))
        current = fingerprint(config)
        if folder.holds_a_run() and not config.resume:
            if not config.overwrite:
                raise ConfigError(
                    f"output: {folder.root} holds another run; continue it with resume=true, or start over with "
                    "overwrite=true (the old run is moved aside, not deleted), or choose another output")
            aside = folder.root.with_name(f"{folder.root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(folder.root, aside)
            say(f"overwrite=true: the previous run in {folder.root} was moved to {aside}")
        if config.resume and folder.holds_a_run():
            folder._check_same_run(current)
            folder._say_what_changed(config, say)
            folder._tidy_after_a_crash()
            write_text(folder.config_file, config_to_yaml(config))
            checkpoint = folder._newest_good_checkpoint(say)
            if checkpoint is None:
                say(f"[yellow]resume=true: no complete checkpoint in {folder.checkpoints}; starting from step 0[/]")
            return folder, checkpoint
        if config.resume:
            say(f"[yellow]resume=true: {folder.root} holds no run yet; starting a new one[/]")
        folder.root.mkdir(parents=True, exist_ok=True)
        write_text(folder.root / FINGERPRINT_FILE, json.dumps(current, indent=1) + "\n")
        write_text(folder.config_file, config_to_yaml(config))
        return folder, None

    def _check_same_run(self, current: dict) -> None:
        """Refuse to resume unless the recorded fingerprint equals `current`, listing every difference."""
        path = self.root / FINGERPRINT_FILE
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError):
            raise ConfigError(f"resume: {path} is missing or unreadable (a run of an older loraforge?), so nothing "
                              "shows this is the same run; start over with overwrite=true") from None
        differences = _differences(recorded, current)
        if differences:
            raise ConfigError(f"resume: {self.root} is a different run; these differ from it: "
                              f"{'; '.join(differences)}. Undo them, or start over with overwrite=true")

    def _say_what_changed(self, config: TrainConfig, say: Callable[[str], None]) -> None:
        """The resumable keys that differ from the config this run last ran with."""
        try:
            previous = yaml.safe_load(self.config_file.read_text()) or {}
        except (OSError, yaml.YAMLError):
            previous = {}
        now = config.model_dump(mode="json")
        changed = [f"{key} {previous[key]!r} → {now[key]!r}" for key in sorted(RESUMABLE_KEYS - {"resume", "overwrite"})
                   if key in previous and previous[key] != now[key]]
        if changed:
            say(f"resume: {', '.join(changed)} (these may change when a run resumes)")

    def _tidy_after_a_crash(self) -> None:
        """Put back a folder a crash left aside mid-swap, and remove what a crash left half-written."""
        for name in ("adapter", "model", "best"):
            recover_folder(self.root / name)
        leftovers = [*self.root.glob(".*.tmp"), *(self.checkpoints.glob(".*.tmp") if self.checkpoints.exists() else [])]
        for leftover in leftovers:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    def _newest_good_checkpoint(self, say: Callable[[str], None]) -> Path | None:
        for checkpoint in reversed(complete_checkpoints(self.checkpoints)):
            problem = verify_checkpoint(checkpoint)
            if problem is None:
                return checkpoint
            say(f"[yellow]checkpoint {checkpoint.name} is damaged ({problem}); trying the one before[/]")
        return None
