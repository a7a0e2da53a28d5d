"""The `loraforge` command on a tiny model: train → chat → eval → merge, config handling, clean errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraforge.cli import main
from loraforge.data import Conversation
from loraforge.demo import DEMO_DATA
from loraforge.evaluate import generate_answers
from loraforge.lora import LoraModel
from loraforge.models import load_model


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("cli-data") / "orders.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:30]))
    run = tmp_path_factory.mktemp("cli-run")
    code = main(["train", f"model={tiny_model_dir}", f"data={data}", f"output={run}", "max_steps=3",
                 "batch_size=4", "lora.r=4", "compare_samples=3", "max_new_tokens=4", "tensorboard=false",
                 "max_seq_len=128"])
    assert code == 0
    return run


def test_train_writes_adapter_evaluation_and_report(trained_run, tiny_model_dir):
    assert (trained_run / "adapter" / "adapter_model.safetensors").exists()
    evaluation = json.loads((trained_run / "evaluation.json").read_text())
    assert evaluation["n"] == 3 and len(evaluation["samples"]) == 3 and evaluation["split"] == "test"
    assert list(evaluation["models"]) == ["base", "tuned"]
    assert set(evaluation["samples"][0]["answers"]) == {"base", "tuned"}
    assert "exact_match" in evaluation["models"]["tuned"] and "loss" in evaluation["models"]["tuned"]
    assert (trained_run / "report.html").exists() and (trained_run / "report.json").exists()
    config = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)


def test_the_comparison_after_training_reuses_the_trained_model(tiny_model_dir, tmp_path, monkeypatch):
    """One model in memory: the comparison runs on the model training left (PiSSA's residual base excepted), and
    its answers are those of the base and of the saved adapter loaded afresh."""
    from loraforge import models
    from loraforge.evaluate import evaluate_models
    from loraforge.train import loop

    loads = []

    def counted(*args, **kwargs):
        loads.append(args[0])
        return load_model(*args, **kwargs)

    monkeypatch.setattr(loop, "load_model", counted)
    monkeypatch.setattr(models, "load_model", counted)
    data = tmp_path / "orders.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:30]))
    common = [f"model={tiny_model_dir}", f"data={data}", "max_steps=2", "batch_size=4", "lora.r=4",
              "compare_samples=3", "max_new_tokens=4", "tensorboard=false", "report=false", "max_seq_len=128"]
    for init, expected_loads in (("kaiming", 1), ("pissa", 2)):
        loads.clear()
        run = tmp_path / init
        assert main(["train", *common, f"output={run}", f"lora.init={init}"]) == 0
        assert len(loads) == expected_loads, init
        fresh, tokenizer = load_model(str(tiny_model_dir))
        lora = LoraModel(fresh)
        lora.load_adapter(run / "best", "tuned")
        test = [Conversation(json.loads(line)["messages"], "t") for line in
                (run / "data" / "test.jsonl").read_text().splitlines()]
        expected = evaluate_models(lora, tokenizer, test, ["tuned"], "auto", 3, 4, batch_size=32, max_seq_len=128)
        written = json.loads((run / "evaluation.json").read_text())
        assert written["samples"] == expected["samples"], init
        assert written["models"]["base"]["loss"] == pytest.approx(expected["models"]["base"]["loss"], rel=1e-5)


def test_a_second_run_on_the_same_base_and_test_prompts_reuses_the_base_side(tiny_model_dir, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "orders.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:30]))
    common = [f"model={tiny_model_dir}", f"data={data}", "max_steps=2", "batch_size=4", "lora.r=4",
              "compare_samples=3", "max_new_tokens=4", "tensorboard=false", "report=false", "max_seq_len=128"]
    evaluations = {}
    for name, extra in (("first", []), ("other_lr", ["lr=5e-3"]), ("fresh", ["compare_cache=false"])):
        capsys.readouterr()
        assert main(["train", *common, f"output={tmp_path / name}", *extra]) == 0
        evaluations[name] = json.loads((tmp_path / name / "evaluation.json").read_text())
        evaluations[name]["printed"] = "earlier run's" in capsys.readouterr().out
    assert "base_from_cache" not in evaluations["first"] and not evaluations["first"]["printed"]
    assert evaluations["other_lr"]["base_from_cache"].startswith(str(tmp_path / "cache" / "comparisons"))
    assert evaluations["other_lr"]["printed"]
    assert "base_from_cache" not in evaluations["fresh"] and not evaluations["fresh"]["printed"]
    base = {name: e["models"]["base"] for name, e in evaluations.items()}
    assert base["other_lr"] == base["first"]
    assert base["fresh"] == pytest.approx(base["first"], rel=1e-5)  # computed again: the same figures
    assert evaluations["other_lr"]["models"]["tuned"] != evaluations["first"]["models"]["tuned"]
    for name in ("other_lr", "fresh"):
        assert [s["answers"]["base"] for s in evaluations[name]["samples"]] == \
            [s["answers"]["base"] for s in evaluations["first"]["samples"]]


def test_chat_one_shot_answer_equals_library_greedy_answer(trained_run, tiny_model_dir, capsys):
    assert main(["chat", "--adapter", f"mine={trained_run / 'adapter'}", "--prompt", "hello",
                 "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = load_model(str(tiny_model_dir))
    lora = LoraModel.from_pretrained(model, trained_run / "adapter")
    expected = generate_answers(lora, tokenizer, [[{"role": "user", "content": "hello"}]], max_new_tokens=5)[0]
    assert printed == expected + "\n"


def test_chat_interactive_switches_adapters(trained_run, monkeypatch, capsys):
    lines = iter(["/use base", "hello", "/use adapter", "/use nope", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--adapter", str(trained_run / "adapter"), "--max-new-tokens", "2"]) == 2
    out = capsys.readouterr()
    assert "active: base" in out.out and "active: ('adapter',)" in out.out
    assert "unknown adapter(s) ['nope']" in out.err


def test_eval_writes_metrics_consistency_and_resources(trained_run, tmp_path, capsys):
    output = tmp_path / "evaluation.json"
    assert main(["eval", str(trained_run), "--split", "validation", "--samples", "3", "--consistency", "2",
                 "--max-new-tokens", "4", "--metrics", "exact_match,rougeL", "--output", str(output)]) == 0
    evaluation = json.loads(output.read_text())
    assert evaluation["metric_names"] == ["exact_match", "rougeL"] and evaluation["n"] == 3
    assert set(evaluation["consistency"]) == {"base", "tuned"}
    assert evaluation["resources"]["trainable_params"] > 0
    assert set(evaluation["resources"]["latency"]) == {"base", "unmerged", "merged"}
    out = capsys.readouterr().out
    assert "loss" in out and "rougeL" in out and "tuned" in out


def test_merge_writes_a_plain_model_equal_to_the_adapter(trained_run, tmp_path):
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(trained_run / "adapter"), "--output", str(merged_dir)]) == 0
    config = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    model, tokenizer = load_model(config["base_model_name_or_path"])
    lora = LoraModel.from_pretrained(model, trained_run / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = tokenizer("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, lora(ids).logits, atol=1e-4, rtol=0)
    assert (merged_dir / "tokenizer_config.json").exists()
    assert not any("lora" in name for name, _ in plain.named_parameters())


def test_print_config_and_yaml_plus_overrides(tmp_path, capsys):
    config_file = tmp_path / "job.yaml"
    config_file.write_text("data: chats.jsonl\nlora:\n  r: 4\nlr: 1.0e-4\n")
    assert main(["train", str(config_file), "lora.r=32", "max_steps=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "  r: 32" in out and "max_steps: 7" in out and "lr: 0.0001" in out and "path: chats.jsonl" in out


def test_no_arguments_means_the_demo_config(capsys):
    assert main(["train", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 60" in out and "model: default" in out
    assert out.startswith("model: default")  # nothing but YAML: the output can be saved as a config file


@pytest.mark.parametrize("args,message", [
    (["train", "lora.rank=4", "--print-config"], "lora.rank: Extra inputs are not permitted"),
    (["train", "batch_size=zero", "--print-config"], "batch_size: Input should be a valid integer"),
    (["train", "data.split=[0.5,0.6,0.1]", "--print-config"], "data.split: Value error, must be three"),
    (["train", "nonsense", "--print-config"], "config file nonsense does not exist"),
    (["chat", "--model", "/no/such/model", "--prompt", "x"], "model path /no/such/model does not exist"),
])
def test_errors_are_one_clear_line_without_traceback(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_data_file_error_names_file_and_line(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                    '{"messages": [{"role": "user", "content": "q"}]\n')
    assert main(["train", f"model={tiny_model_dir}", f"data={data}", f"output={tmp_path / 'run'}"]) == 2
    assert f"{data}:2: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["data.path", "data.validation_path", "data.test_path"])
def test_a_missing_data_file_is_named_by_its_key_and_nothing_is_written(tiny_model_dir, tmp_path, capsys, key):
    missing, run = tmp_path / "missing.jsonl", tmp_path / "run"
    assert main(["train", f"model={tiny_model_dir}", f"data={DEMO_DATA}", f"{key}={missing}", f"output={run}"]) == 2
    err = capsys.readouterr().err
    assert f"{key}: data file {missing} does not exist" in err and "bug" not in err
    assert not run.exists()


def test_an_unexpected_error_is_one_line_naming_where_it_happened(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from loraforge import train as train_module

    def broken(config, console=None, keep_model=False):
        raise ZeroDivisionError("division by zero\nsecond line of detail")

    monkeypatch.setattr(train_module, "train", broken)
    args = ["train", f"model={tiny_model_dir}", f"data={DEMO_DATA}", f"output={tmp_path}"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: unexpected ZeroDivisionError: division by zero (in loraforge/cli.py:")
    assert "loraforge --debug" in err
    with pytest.raises(ZeroDivisionError):  # --debug shows the traceback
        main(["--debug", *args])


def test_output_to_a_file_keeps_whole_lines(tmp_path):
    from loraforge.console import LOG_WIDTH, make_console

    line = "data: " + "a long line a CI log must keep whole " * 5
    with open(tmp_path / "log.txt", "w") as file:
        console = make_console(file)
        console.print(line)
    assert console.width == LOG_WIDTH
    assert (tmp_path / "log.txt").read_text() == line + "\n"


def test_cli_output_has_no_library_progress_bars(tiny_model_dir, capfd):
    import transformers

    try:
        assert main(["chat", "--model", str(tiny_model_dir), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
        out, err = capfd.readouterr()
        assert "Loading weights" not in out + err and "it/s" not in out + err
    finally:
        transformers.utils.logging.enable_progress_bar()
        transformers.utils.logging.set_verbosity_warning()
