"""What a lent GPU machine needs to run bench/gpu_check.sh, gathered here: that machine reaches no network.

    python bench/gpu_kit.py            # or `make gpu-kit`: writes .gpu/ (ignored by git; ~30 MB)

- .gpu/wheels: the lock's versions (requirements/bench.txt) of the packages the device image lacks or holds at
  another version, built for its Python 3.12. Its own CUDA torch stays: a CUDA wheel is GBs, over the 64 MiB a
  call may carry.
- .gpu/model: SmolLM2-135M-Instruct's config.json and tokenizer. The weights (540 MB) cannot travel either, so
  the device check runs the same architecture with seeded random weights: speed and memory do not depend on the
  values, and every row of a benchmark trains the same random model.

Then, with the `device` tool: run `bash bench/gpu_check.sh` with carry [".gpu"] (BENCHMARKS.md, "GPU").
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# Missing from the device image, or there at a version our code was not locked against (its package list:
# ../.library/device/KINDS.md); the rest (numpy, safetensors, accelerate, rich, PyYAML, psutil, ...) it has.
CARRIED = ("transformers", "tokenizers", "huggingface-hub", "pydantic", "pydantic-core", "annotated-types",
           "typing-inspection", "peft", "trl", "datasets", "dill", "multiprocess", "gguf", "rouge-score", "nltk",
           "fastapi", "starlette", "annotated-doc", "uvicorn",
           # what those need beyond the image (their Requires-Dist against its package list)
           "defusedxml", "httpx2", "httpcore2", "truststore", "opentelemetry-api")
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
CARRY_LIMIT_BYTES = 64 * 2**20  # what one device call may carry, the working tree included


def locked_versions(lock: Path) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", lock.read_text(), flags=re.MULTILINE)
    return {canonicalize_name(name): version for name, version in pins}


def download_wheels(into: Path) -> None:
    versions = locked_versions(ROOT / "requirements" / "bench.txt")
    missing = [name for name in CARRIED if name not in versions]
    if missing:
        raise SystemExit(f"not in requirements/bench.txt: {', '.join(missing)}")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    platform_flags = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    for name in CARRIED:
        pin = f"{name}=={versions[name]}"
        binary = subprocess.run(pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version",
                                       DEVICE_PYTHON, "--implementation", "cp", *platform_flags, "-d", str(into),
                                       pin], capture_output=True, text=True)
        if binary.returncode != 0:  # a source-only release (rouge-score): pure Python, built into a wheel here
            subprocess.run(pip + ["wheel", "--no-deps", "-w", str(into), pin], check=True)


def write_model(into: Path) -> None:
    from transformers import AutoTokenizer

    from loraforge.models import resolve_model_path

    source = resolve_model_path("default")  # converts the embedded GGUF once, into the cache
    into.mkdir(parents=True)
    shutil.copy(source / "config.json", into / "config.json")
    AutoTokenizer.from_pretrained(source).save_pretrained(into)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--into", default=str(ROOT / ".gpu"))
    args = parser.parse_args()
    kit = Path(args.into)
    shutil.rmtree(kit, ignore_errors=True)
    (kit / "wheels").mkdir(parents=True)
    download_wheels(kit / "wheels")
    write_model(kit / "model")
    size = sum(f.stat().st_size for f in kit.rglob("*") if f.is_file())
    print(f"{kit}: {size / 2**20:.1f} MB ({len(list((kit / 'wheels').iterdir()))} wheels, model config + tokenizer)")
    if size > CARRY_LIMIT_BYTES // 2:
        raise SystemExit(f"{kit} is {size / 2**20:.0f} MB: with the working tree it may not fit a device call")


if __name__ == "__main__":
    main()
