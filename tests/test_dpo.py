"""stage=dpo: TRL's preference formats with file:line errors, a tiny model learning a trivial preference, the
comparison after training, and a step-exact resume."""

import json

import pytest
import torch
from conftest import crash_when_taking_step
from safetensors.torch import load_file

from loraforge.cli import main
from loraforge.config import DataConfig, load_train_config
from loraforge.data import DataReport
from loraforge.demo import DEMO_DATA
from loraforge.errors import ConfigError, DataError
from loraforge.train import train
from loraforge.train.checkpoint import complete_checkpoints
from loraforge.train.dpo import DpoStage, load_pairs, to_pair

WRONG = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Order messages: chosen = the JSON answer, rejected = always the same unrelated sentence."""
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()[:60]]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["messages"][:-1], "chosen": [r["messages"][-1]],
                                        "rejected": [{"role": "assistant", "content": WRONG}]}) + "\n" for r in rows))
    return path


def _overrides(tiny_model_dir, data, output, *extra):
    return [f"model={tiny_model_dir}", f"data={data}", f"output={output}", "stage=dpo", "batch_size=4", "max_steps=12",
            "eval_every=4", "lr=2e-2", "lora.r=4", "compare=false", "report=false", "tensorboard=false",
            "max_seq_len=128", *extra]


def test_the_three_preference_formats_read_alike():
    conversational = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Yes."}],
                      "rejected": [{"role": "assistant", "content": "No."}]}
    strings = {"prompt": "Hi?", "chosen": "Yes.", "rejected": "No."}
    implicit = {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes."}],
                "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}]}
    read = [to_pair(row, "f:1").to_row() for row in (conversational, strings, implicit)]
    assert read[0] == read[1] == read[2]


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "Hi?", "chosen": "Yes."}, "needs 'chosen' and 'rejected'"),
    ({"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}, "the same answer"),
    ({"prompt": "Hi?", "chosen": [{"role": "user", "content": "x"}], "rejected": "No."}, "assistant answer"),
    ({"prompt": "Hi?", "chosen": 3, "rejected": "No."}, "must be a string or"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "no non-empty user turn"),
])
def test_bad_preference_rows_name_file_and_line(tmp_path, row, problem):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"pairs.jsonl:2: .*{problem}"):
        load_pairs(path, DataConfig(), DataReport())
    report = DataReport()
    assert len(load_pairs(path, DataConfig(skip_invalid=True), report)) == 1 and report.rows_invalid == 1


def test_dpo_options_belong_to_their_stage():
    with pytest.raises(ConfigError, match="dpo: options of stage=dpo"):
        load_train_config(None, ["dpo.beta=0.5"])
    with pytest.raises(ConfigError, match="finetune=full has no adapter"):
        load_train_config(None, ["stage=dpo", "finetune=full"])


def test_a_tiny_model_learns_a_trivial_preference(tiny_model_dir, pairs_file, tmp_path):
    run = tmp_path / "run"
    code = main(["train", *_overrides(tiny_model_dir, pairs_file, run, "compare=true", "compare_samples=6")])
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in rows if "val_accuracy" in r]
    assert validation[-1]["val_accuracy"] == 1.0 and validation[-1]["val_margin"] > validation[0]["val_margin"] > 0
    assert validation[-1]["val_loss"] < 0.5 < 0.693  # log 2: where every pair starts (policy = reference)
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["stage"] == "dpo" and evaluation["metric_names"][0] == "prefers_chosen"
    assert evaluation["models"]["tuned"]["prefers_chosen"] == 1.0
    assert evaluation["models"]["tuned"]["loss"] < evaluation["models"]["base"]["loss"]  # on the chosen answers
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stage"] == "dpo" and summary["dataset_bits"] == 12 * 4  # one bit per pair trained
    (run / "evaluation.json").unlink()
    assert main(["eval", str(run), "--samples", "6"]) == 0  # the run's own comparison again, from its files
    assert json.loads((run / "evaluation.json").read_text())["models"] == evaluation["models"]


def test_dpo_resumes_step_exactly_after_a_crash(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(load_train_config(None, _overrides(tiny_model_dir, pairs_file, straight, "save_every=2", "max_steps=6")))
    original = crash_when_taking_step(monkeypatch, DpoStage, 5)
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="power cut"):
        train(load_train_config(None, _overrides(tiny_model_dir, pairs_file, crashed, "save_every=2", "max_steps=6")))
    assert [p.name for p in complete_checkpoints(crashed / "checkpoints")] == ["step-0000002", "step-0000004"]
    monkeypatch.setattr(DpoStage, "micro_batches", original)
    result = train(load_train_config(None, _overrides(tiny_model_dir, pairs_file, crashed, "save_every=2",
                                                      "max_steps=6", "resume=true")))
    assert result.steps == 6 and len(result.losses) == 2
    losses = [[json.loads(line).get("train_loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (straight, crashed)]
    assert [x for x in losses[0] if x] == [x for x in losses[1] if x]
    a, b = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (straight, crashed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
