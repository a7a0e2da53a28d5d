"""Full fine-tuning in the trainer, the advisors at the start of `train`, and `compare` / `sweep` on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from rich.console import Console
from safetensors.torch import load_file

from loraforge import LoraConfig
from loraforge import compare as compare_module
from loraforge.cli import main
from loraforge.compare import best_learning_rates, derive
from loraforge.config import load_train_config
from loraforge.demo import DEMO_DATA
from loraforge.errors import ConfigError
from loraforge.evaluate import evaluate_loss
from loraforge.lora.targeting import find_targets
from loraforge.models import load_model
from loraforge.train import train
from loraforge.train.checkpoint import complete_checkpoints


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "orders.jsonl"
    path.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:40]))
    return path


def _overrides(tiny_model_dir, small_data, *extra) -> list[str]:
    return [f"model={tiny_model_dir}", f"data={small_data}", "batch_size=4", "max_steps=4", "eval_every=2",
            "lora.r=4", "compare=false", "report=false", "tensorboard=false", "max_seq_len=128", *extra]


def test_full_finetuning_trains_every_weight_and_writes_a_whole_model(tiny_model_dir, small_data, tmp_path):
    console = Console(record=True, width=200)
    config = load_train_config(None, _overrides(tiny_model_dir, small_data, f"output={tmp_path}", "finetune=full",
                                                "lr=1e-2"))
    result = train(config, console)
    assert result.losses[-1] < result.losses[0]
    assert result.adapter == tmp_path / "model" and result.best_adapter == tmp_path / "best"
    assert (complete_checkpoints(tmp_path / "checkpoints")[-1] / "trainee.safetensors").exists()  # resumable
    base = load_file(tiny_model_dir / "model.safetensors")
    tuned = load_file(tmp_path / "model" / "model.safetensors")
    assert base.keys() == tuned.keys()
    assert all(not torch.equal(base[k], tuned[k]) for k in base if "norm" not in k)  # every matrix moved
    # The saved folder is a plain model: loaded back, it has the validation loss the run reported.
    model, tokenizer = load_model(tmp_path / "model")
    from loraforge.data import prepare_data

    data = prepare_data(config.data, tokenizer, config.max_seq_len, config.seed)
    reloaded = evaluate_loss(model, data.validation.examples, tokenizer.pad_token_id, 4, torch.device("cpu"))
    assert reloaded["loss"] == pytest.approx(result.final_val_loss, rel=1e-5)
    text = console.export_text()
    assert "full fine-tuning: " in text and "(learning rate): lr=0.01; suggested for full fine-tuning" in text


def test_full_finetuning_refuses_quantized_bases(tiny_model_dir, small_data, tmp_path):
    config = load_train_config(None, _overrides(tiny_model_dir, small_data, f"output={tmp_path}", "finetune=full",
                                                "quant=nf4"))
    with pytest.raises(ConfigError, match="finetune=full"):
        train(config)


def test_train_prints_the_advisors(tiny_model_dir, small_data, tmp_path):
    console = Console(record=True, width=300)
    config = load_train_config(None, _overrides(tiny_model_dir, small_data, f"output={tmp_path}", "max_steps=1",
                                                "lr=1e-6", "lora.targets=[q_proj,v_proj]"))
    train(config, console)
    text = console.export_text()
    assert "warning (learning rate): lr=1e-06" in text and "lower" in text
    assert "(capacity): dataset ≈" in text
    assert "warning (targets): attention-only" in text


def test_derive_replaces_dotted_keys_and_validates(tiny_model_dir, small_data):
    base = load_train_config(None, _overrides(tiny_model_dir, small_data))
    derived = derive(base, {"lora.r": 16, "lr": 3e-3, "finetune": "full"})
    assert (derived.lora.r, derived.lr, derived.finetune, derived.lora.alpha) == (16, 3e-3, "full", base.lora.alpha)
    assert base.lora.r == 4
    with pytest.raises(ConfigError, match="lora.r"):
        derive(base, {"lora.r": 0})


def test_compare_reports_full_lora_and_qlora_on_the_same_budget(tiny_model_dir, small_data, tmp_path):
    output = tmp_path / "cmp"
    assert main(["compare", *_overrides(tiny_model_dir, small_data, "max_steps=2", "eval_every=1"),
                 "--output", str(output),
                 "--full-lr", "1e-3", "--lora-lr", "1e-2"]) == 0
    data = json.loads((output / "compare.json").read_text())
    assert not data["skipped"]
    full, lora, qlora = data["runs"]
    assert qlora["arm"] == "qlora" and qlora["steps"] == 2 and qlora["general_before"] != lora["general_before"]
    assert (full["arm"], lora["arm"]) == ("full", "lora") and (full["lr"], lora["lr"]) == (1e-3, 1e-2)
    assert full["steps"] == lora["steps"] == 2
    assert full["trainable"] > lora["trainable"] and full["file_mb"] > 5 * lora["file_mb"]
    assert full["flops_per_token"] > lora["flops_per_token"]
    # Same evaluations at the same steps; FLOPs grow with the tokens seen.
    assert [p[0] for p in full["val_curve"]] == [p[0] for p in lora["val_curve"]] == [1, 2]
    assert full["val_curve"][-1][1] == pytest.approx(full["final_val_loss"])
    assert full["val_curve"][1][2] > full["val_curve"][0][2] > 0
    assert full["general_before"] == lora["general_before"] != full["general_after"]
    assert full["peak_mb"] > 0 and lora["peak_mb"] > 0
    page = (output / "compare.html").read_text()
    assert page.count("<img") == 2 and "skipped" not in page and "vs full" in page and "qlora" in page
    assert (output / "full" / "model" / "model.safetensors").exists()
    assert (output / "lora" / "adapter" / "adapter_model.safetensors").exists()


def test_sweep_plots_final_loss_per_rank_and_learning_rate(tiny_model_dir, small_data, tmp_path):
    output = tmp_path / "sweep"
    assert main(["sweep", *_overrides(tiny_model_dir, small_data, "max_steps=2"), "--output", str(output),
                 "--ranks", "2,8", "--lrs", "1e-2", "--full-lrs", "1e-3", "--targets", "attention"]) == 0
    data = json.loads((output / "sweep.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["attention-r2-lr0.01", "attention-r8-lr0.01", "full-lr0.001"]
    assert all(isinstance(r["final_val_loss"], float) for r in data["runs"])
    assert set(data["best"]) == {"attention r=2", "attention r=8", "full fine-tuning"}
    adapter = json.loads((output / "attention-r8-lr0.01" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["target_modules"] == compare_module.TARGET_SETS["attention"]
    assert not (output / "full-lr0.001" / "model").exists()  # whole models are dropped unless --keep-models
    page = (output / "sweep.html").read_text()
    assert page.count("<img") == 1 and "Best learning rate per line" in page and "÷" in page


def test_sweep_without_ranks_or_lrs_runs_the_default_grid_around_the_advisors_lr(tiny_model_dir, small_data, tmp_path,
                                                                                  monkeypatch):
    from loraforge import train as train_module
    from loraforge.advise import suggested_lr
    from loraforge.errors import TrainingError

    trained = []

    def record(config, console=None):  # the grid is the point here, not nine trainings
        trained.append((config.lora.r, config.lr))
        raise TrainingError("not trained in this test")

    monkeypatch.setattr(train_module, "train", record)
    output = tmp_path / "sweep"
    assert main(["sweep", *_overrides(tiny_model_dir, small_data, "max_steps=2"), "--output", str(output)]) == 0
    config = load_train_config(None, _overrides(tiny_model_dir, small_data, "max_steps=2"))
    advised = suggested_lr("llama", 32, "lora", 2, config.lora.r, config.lora.alpha)
    assert [r for r, _ in trained] == [4] * 3 + [16] * 3 + [64] * 3
    assert [lr for _, lr in trained[:3]] == pytest.approx([advised / 3, advised, advised * 3], rel=0.05)  # 2 digits
    assert len(json.loads((output / "sweep.json").read_text())["runs"]) == 9


@pytest.mark.parametrize("target_set,suffixes", [
    ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("mlp", {"gate_proj", "up_proj", "down_proj"}),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_sweep_target_sets_select_attention_or_mlp(target_set, suffixes):
    targets = find_targets(make_model("llama"), LoraConfig(targets=compare_module.TARGET_SETS[target_set]))
    assert {name.rsplit(".", 1)[-1] for name in targets.modules} == suffixes
    assert len(targets.modules) == 2 * len(suffixes)  # both layers


def test_best_learning_rates_pick_the_lowest_final_loss_per_line():
    runs = [{"kind": "lora", "targets": "all-linear", "r": 4, "lr": lr, "final_val_loss": loss}
            for lr, loss in ((1e-4, 1.0), (1e-3, 0.5), (1e-2, None))]
    runs += [{"kind": "full", "targets": None, "r": None, "lr": lr, "final_val_loss": loss}
             for lr, loss in ((1e-5, 0.9), (1e-4, 0.6))]
    assert best_learning_rates(runs) == {"all-linear r=4": {"lr": 1e-3, "loss": 0.5},
                                         "full fine-tuning": {"lr": 1e-4, "loss": 0.6}}


def test_cli_train_full_finetune_finishes_without_adapter_comparison(tiny_model_dir, tmp_path):
    from loraforge.cli import main
    from loraforge.demo import DEMO_DATA

    data = tmp_path / "orders.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:30]))
    code = main(["train", f"model={tiny_model_dir}", f"data={data}", f"output={tmp_path / 'run'}", "finetune=full",
                 "max_steps=2", "batch_size=4", "tensorboard=false", "report=false", "compare_samples=4"])
    assert code == 0
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
