"""Where a whole process's time and memory go: run a command, stamp each line it prints with the seconds since
start and the resident set (of the process tree) at that moment, and report the peak.

    python bench/timeline.py -- loraforge train max_steps=40
    python bench/timeline.py --json timeline.json -- loraforge train

Lines are the phases the job announces (loading, data, advice, steps, validation, comparison, report), so the
output reads as a timeline of RSS by phase. The resident set is sampled every 50 ms by psutil.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

import psutil


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def run(command: list[str], echo: bool = True) -> dict:
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    process = psutil.Process(child.pid)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                samples.append((time.perf_counter() - start, tree_rss(process)))
            except psutil.Error:
                return
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in child.stdout:
        now = time.perf_counter() - start
        rss = max((r for t, r in samples[-3:]), default=0)
        lines.append({"t": round(now, 2), "rss_mb": round(rss / 2**20), "line": line.rstrip()})
        if echo:
            print(f"{now:7.1f}s {rss / 2**20:6.0f} MB  {line.rstrip()}", flush=True)
    code = child.wait()
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    peak = max((r for _, r in samples), default=0)
    if echo:
        print(f"{wall:7.1f}s  exit {code}; peak RSS {peak / 2**20:,.0f} MB")
    return {"command": command, "wall_s": wall, "peak_rss_mb": peak / 2**20, "exit": code, "lines": lines,
            "rss": [(round(t, 2), round(r / 2**20)) for t, r in samples]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the timeline (lines and RSS samples) here")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    result = run(command)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    sys.exit(result["exit"])


if __name__ == "__main__":
    main()
