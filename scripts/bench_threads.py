#!/usr/bin/env python3
"""CPU training beside other work: torch's default threads against the count peftcli chooses.

    python scripts/bench_threads.py [--busy 0,4] [--steps 60] [--model models/tiny]

For each number of busy processes (pure-Python spin loops started beside it), trains the tiny
model on the demo data twice with `peftcli train`: once as torch would run by itself (threads =
the cores in the affinity mask, OpenMP's default spinning wait) and once with peftcli's choice
(model/speed.py `cpu_threads`: affinity, cgroup quota and load average; passive wait). Prints the
training time (metrics.json train_runtime_s: the fit alone, not the imports), the threads used and
the final loss of each. Build the model first: python scripts/make_tiny_model.py (or `make demo`).
Timings are for reading, not for tests: they depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def recipe(model: Path, out: Path, steps: int) -> dict:
    return {
        "model": {"name": str(model)},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(ROOT / "recipes" / "data" / "demo_train.jsonl"), "max_length": 64},
        "training": {"max_steps": steps, "batch_size": 16, "learning_rate": 5e-3, "save_steps": steps, "seed": 7},
        "output": {"dir": str(out)},
    }


def train(model: Path, scratch: Path, name: str, steps: int, env: dict) -> dict:
    out = scratch / name
    path = scratch / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe(model, out, steps)), encoding="utf-8")
    subprocess.run(
        [sys.executable, "-m", "peftcli", "-q", "train", str(path), "--overwrite"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    settings = metrics["settings"]
    return {
        "fit_s": metrics["train_runtime_s"],
        "threads": settings.get("cpu_threads") or env.get("OMP_NUM_THREADS", "default"),
        "why": settings.get("cpu_threads_reason", ""),
        "loss": metrics["loss_history"][-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", default="0,4", help="numbers of busy processes to run beside it")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "tiny")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    # torch by itself: one thread per core it may run on, OpenMP's default (spinning) wait; an empty
    # OMP_WAIT_POLICY keeps peftcli from setting PASSIVE and leaves the runtime's default.
    default_env = {**base, "OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": ""}
    print(f"{cores} cores in the affinity mask, {args.steps} steps of LoRA on {args.model}")
    print(f"{'busy':>4} {'run':<8} {'fit s':>7} {'threads':>7} {'loss':>8}  why")
    with tempfile.TemporaryDirectory() as scratch:
        for busy in (int(n) for n in args.busy.split(",")):
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                if busy:
                    time.sleep(15)  # let the load average see them, as it would on a machine busy for a while
                for name, env in (("default", default_env), ("peftcli", base)):
                    row = train(args.model, Path(scratch), name, args.steps, env)
                    figures = f"{row['fit_s']:>7.1f} {row['threads']!s:>7} {row['loss']:>8.4f}"
                    print(f"{busy:>4} {name:<8} {figures}  {row['why']}", flush=True)
            finally:
                for spinner in spinners:
                    spinner.kill()
                    spinner.wait()


if __name__ == "__main__":
    main()
