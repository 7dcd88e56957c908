#!/usr/bin/env python3
"""peftcli vs the plain TRL script, side by side, in one invocation (`make bench`).

    python scripts/bench.py [--config cpu|llama-1b|llama-8b] [--steps N] [--ablate] [--keep] [--out DIR]

Builds a random-init model of the chosen shape (no hub needed) and a synthetic chat dataset whose
lengths spread like real chat data (log-normal: many short turns, a long tail up to max_length),
then trains it for the same steps with the same batch, learning rate, max length and LoRA settings
with scripts/baseline_trl.py (TRL's documented SFTTrainer + LoraConfig, defaults), with `peftcli
train` (its defaults), and with scripts/bench_floor.py: the same model's forward and backward on the
same batches with no trainer, so the trainer's overhead shows. `--ablate` adds peftcli runs with one
fast default flipped each, to show what each is worth.

Per row: tokens/s end to end (real tokens over the whole training call) and at steady state (from
per-step timestamps, warm-up steps excluded: what a long run feels like), step time, real and padded
tokens, peak memory, MFU (steady state, bf16 peak of the device; peftcli/model/device.py) and the final loss; on
peftcli's defaults row, the fit estimate for its largest micro-batch beside the measured peak. The
JSON (device, versions, commit, config, rows) goes to benchmarks/results/ (or --out), rewritten
after every row so that a run cut short keeps what it measured.

Ratios are only meaningful within one invocation: the runs share the machine, model and data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
sys.path.insert(0, str(ROOT / "scripts"))
from bench_assets import build_assets, synthetic_rows  # noqa: E402

__all__ = ["CONFIGS", "build_assets", "recipe_for", "synthetic_rows"]

# Real shapes for the GPU configs (Llama-3.2-1B and Llama-3.1-8B); a small one that trains in
# a minute or two on CPU.
CONFIGS = {
    "cpu": dict(
        shape=dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
        vocab=4096,
        max_length=512,
        batch_size=8,
        steps=30,
        quantize=False,
    ),
    "llama-1b": dict(
        shape=dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=True,
            rope_theta=500000.0,
        ),
        vocab=128256,
        max_length=2048,
        batch_size=8,
        steps=40,
        quantize=False,
    ),
    "llama-8b": dict(
        shape=dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=False,
            rope_theta=500000.0,
        ),
        vocab=128256,
        max_length=2048,
        batch_size=1,
        steps=20,
        quantize=True,
    ),
}
LORA = {"r": 16, "alpha": 32}
LEARNING_RATE = 2e-4
# peftcli runs with one fast default flipped, per device kind: (label, --set overrides)
# The GPU list is what scripts/gpu_check.sh can afford in its time budget; tf32 (bf16 training does
# not use it) and compile (its warm-up dwarfs a 40-step run) are left to --set by hand.
ABLATIONS = {
    "cpu": [("packing on", ["data.packing=true"]), ("checkpointing on", ["training.gradient_checkpointing=true"])],
    "gpu": [
        ("packing off", ["data.packing=false"]),
        ("checkpointing on", ["training.gradient_checkpointing=true"]),
        ("liger off", ["training.liger=false"]),
    ],
}


def recipe_for(name: str, model: Path, data: Path, out: Path) -> dict:
    config = CONFIGS[name]
    recipe = {
        "model": {"name": str(model)},
        "peft": {
            "method": "lora",
            "r": LORA["r"],
            "alpha": LORA["alpha"],
            "dropout": 0.0,
            "target_modules": "all-linear",
        },
        "data": {"train": str(data), "format": "messages", "max_length": config["max_length"]},
        "training": {
            "max_steps": config["steps"],
            "batch_size": config["batch_size"],
            "learning_rate": LEARNING_RATE,
            "save_steps": config["steps"],
        },
        "output": {"dir": str(out)},
    }
    if config["quantize"]:
        recipe["quantization"] = {"bits": 4}
    return recipe


def timed(command: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    return time.perf_counter() - started, proc


def failure(label: str, proc: subprocess.CompletedProcess) -> dict:
    lines = proc.stderr.strip().splitlines()
    return {"run": label, "error": lines[-1] if lines else f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}


def measured(label: str, wall: float, raw: dict) -> dict:
    """A table row from a run's result: end-to-end and steady-state throughput, tokens, memory."""
    from peftcli.training.trainer import steady_state

    step_tokens = raw.get("step_tokens") or []
    real, padded = [r for r, _ in step_tokens], [p for _, p in step_tokens]
    steady = steady_state(raw.get("step_ends") or [], real, padded)
    total_real = raw.get("train_tokens") or sum(real)
    total_padded = sum(padded)
    return {
        "run": label,
        "wall_s": round(wall, 2),
        "train_runtime_s": round(raw["train_runtime_s"], 2),
        "steps": len(step_tokens),
        "tokens_per_s": round(total_real / raw["train_runtime_s"], 1),
        "steady_tokens_per_s": round(steady.tokens_per_s, 1) if steady else None,
        "step_time_s": round(steady.step_time_s, 4) if steady else None,
        "warmup_steps": steady.warmup_steps if steady else None,
        "real_tokens": int(total_real),
        "padded_tokens": int(total_padded),
        "padding_fraction": round(total_padded / (total_real + total_padded), 4) if total_real else None,
        "largest_batch_tokens": max((r + p for r, p in step_tokens), default=None),
        "peak_memory_mb": raw.get("peak_memory_mb"),
        "peak_memory_kind": raw.get("peak_memory_kind"),
        "train_loss": raw.get("train_loss"),
        "settings": raw.get("settings"),
    }


def run_baseline(name: str, model: Path, data: Path, work: Path) -> dict:
    config, result = CONFIGS[name], work / "baseline.json"
    shutil.rmtree(work / "baseline", ignore_errors=True)
    command = [PYTHON, str(ROOT / "scripts" / "baseline_trl.py"), "--model", str(model), "--data", str(data)]
    command += ["--out", str(work / "baseline"), "--result", str(result), "--steps", str(config["steps"])]
    command += ["--batch-size", str(config["batch_size"]), "--lr", str(LEARNING_RATE)]
    command += ["--max-length", str(config["max_length"]), "--r", str(LORA["r"]), "--alpha", str(LORA["alpha"])]
    label = "baseline (TRL docs script)"
    wall, proc = timed(command + (["--qlora"] if config["quantize"] else []))
    if proc.returncode != 0:
        return failure(label, proc)
    return measured(label, wall, json.loads(result.read_text()))


def run_peftcli(name: str, model: Path, data: Path, work: Path, label: str, overrides: list[str]) -> dict:
    import yaml

    slug = label.replace(" ", "-").replace(",", "")
    out, recipe, steps = work / f"peftcli-{slug}", work / f"{slug}.yaml", work / f"{slug}-steps.json"
    recipe.write_text(yaml.safe_dump(recipe_for(name, model, data, out)), encoding="utf-8")
    sets = [item for o in overrides for item in ("--set", o)]
    command = [PYTHON, "-m", "peftcli", "train", str(recipe), "--overwrite", *sets]
    wall, proc = timed(command, env={"PEFTCLI_STEP_LOG": str(steps)})
    if proc.returncode != 0:
        return failure(label, proc)
    metrics = json.loads((out / "metrics.json").read_text())
    log = json.loads(steps.read_text())
    row = measured(label, wall, {**metrics, **log})
    row.update(recipe=str(recipe), overrides=overrides, flops_per_token=metrics.get("flops_per_token"))
    row["largest_batch_tokens"] = log.get("largest_batch_tokens") or row["largest_batch_tokens"]
    return row


def run_floor(name: str, model: Path, data: Path, work: Path, defaults: dict) -> dict:
    """The no-trainer floor with what peftcli's defaults row used: kernel, layout, checkpointing."""
    config, settings, result = CONFIGS[name], defaults.get("settings") or {}, work / "floor.json"
    command = [PYTHON, str(ROOT / "scripts" / "bench_floor.py"), "--model", str(model), "--data", str(data)]
    command += ["--result", str(result), "--steps", str(config["steps"]), "--batch-size", str(config["batch_size"])]
    command += ["--max-length", str(config["max_length"]), "--r", str(LORA["r"]), "--alpha", str(LORA["alpha"])]
    command += ["--layout", settings.get("packing_layout", "padded")]
    command += ["--attn", settings["attn_implementation"]] if settings.get("attn_implementation") else []
    command += ["--checkpointing"] if settings.get("gradient_checkpointing") else []
    command += ["--qlora"] if config["quantize"] else []
    label = "floor: same model, data and layout, no trainer"
    wall, proc = timed(command)
    if proc.returncode != 0:
        return failure(label, proc)
    return measured(label, wall, json.loads(result.read_text()))


def fit_estimate(recipe_file: Path, settings: dict, tokens: int | None) -> float:
    from peftcli.model.checks import read_config
    from peftcli.model.size import estimate
    from peftcli.recipe import load_recipe

    recipe = load_recipe(recipe_file)
    checkpointing = settings.get("gradient_checkpointing")
    return estimate(recipe, read_config(recipe.model), checkpointing=checkpointing, tokens=tokens).total_gib


def add_mfu(rows: list[dict], device: str) -> None:
    """MFU at steady state for every row, with FLOPs per token from peftcli's run (same model and LoRA)."""
    from peftcli.model.device import peak_tflops

    flops = next((r["flops_per_token"] for r in rows if r.get("flops_per_token")), None)
    peak = peak_tflops(device) if not device.startswith("cpu") else None
    for row in rows:
        steady = row.get("steady_tokens_per_s")
        row["mfu"] = round(steady * flops / (peak * 1e12), 4) if flops and peak and steady else None


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["run"].startswith("baseline") and "error" not in r), None)
    head = "| run | tokens/s | steady tokens/s | step (s) | padding | peak MiB | MFU | final loss | vs baseline |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error'][:150]} |" + " |" * 7)
            continue
        ratio = None
        if base and base.get("steady_tokens_per_s") and r.get("steady_tokens_per_s"):
            ratio = r["steady_tokens_per_s"] / base["steady_tokens_per_s"]
        lines.append(
            f"| {r['run']} | {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['steady_tokens_per_s'], ',.0f')} | "
            f"{fmt(r['step_time_s'], '.3f')} | {fmt(r['padding_fraction'], '.1%')} | "
            f"{fmt(r['peak_memory_mb'], ',.0f')} | {fmt(r.get('mfu'), '.1%')} | {fmt(r['train_loss'], '.4f')} | "
            f"{fmt(ratio, '.2f')}{'x' if ratio else ''} |"
        )
    return "\n".join(lines)


def environment() -> dict:
    import torch

    from peftcli.rundir.report import versions

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "versions": versions(),
        "commit": commit.stdout.strip() or None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def update_docs(config: str, markdown: str) -> None:
    readme = ROOT / "docs" / "performance.md"
    text = readme.read_text(encoding="utf-8")
    start, end = f"<!-- bench:{config} -->", f"<!-- /bench:{config} -->"
    if start not in text or end not in text:
        print(f"docs/performance.md has no {start} ... {end} markers; not updated", file=sys.stderr)
        return
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    readme.write_text(f"{before}{start}\n{markdown}\n{end}{after}", encoding="utf-8")
    print(f"docs/performance.md table for {config} updated")


def fit_line(row: dict) -> str:
    measured_gib = row["peak_memory_mb"] / 1024
    if row["peak_memory_kind"] == "cuda_allocated":
        return (
            f"fit estimate {row['fit_estimate_gib']:.2f} GiB for the largest micro-batch "
            f"({row['largest_batch_tokens']:,} tokens) vs measured {measured_gib:.2f} GiB "
            f"({100 * (row['fit_estimate_gib'] / measured_gib - 1):+.0f} %)"
        )
    return (
        f"fit estimate {row['fit_estimate_gib']:.2f} GiB (a GPU figure; on CPU the measured peak is the "
        f"process's resident memory, {measured_gib:.2f} GiB, which is not comparable)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="cpu")
    parser.add_argument("--steps", type=int, help="override the config's steps")
    parser.add_argument("--ablate", action="store_true", help="also run peftcli with each fast default flipped")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where the JSON goes")
    parser.add_argument("--keep", action="store_true", help="keep the model, data and runs in --work")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="replace docs/performance.md's table for this config (between <!-- bench:CONFIG --> markers)",
    )
    args = parser.parse_args()
    import torch

    if args.config != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--config {args.config} needs a CUDA GPU; use --config cpu here")
    config = CONFIGS[args.config]
    if args.steps:
        config["steps"] = args.steps
    work = args.work / args.config
    model, data = build_assets(config, work)
    print(
        f"bench {args.config}: {config['steps']} steps, batch {config['batch_size']}, max_length "
        f"{config['max_length']}; model and data in {work}",
        file=sys.stderr,
    )
    result = {"config": args.config, **config, **environment(), "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    slug = result["device"].split(" (")[0].replace(" ", "-")
    path = args.out / f"{args.config}-{slug}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    rows = result["rows"]

    def record(row: dict) -> None:
        rows.append(row)
        done = row["error"] if "error" in row else f"{row['tokens_per_s']:,.0f} tokens/s"
        print(f"{row['run']}: {done}", file=sys.stderr)
        add_mfu(rows, result["device"])
        path.write_text(json.dumps({**result, "table": table(rows)}, indent=2) + "\n", encoding="utf-8")

    # peftcli first: on a GPU machine with a time limit (scripts/gpu_check.sh) its row matters most.
    defaults = run_peftcli(args.config, model, data, work, "peftcli (defaults)", [])
    if "error" not in defaults:
        tokens = defaults["largest_batch_tokens"]
        defaults["fit_estimate_gib"] = round(fit_estimate(Path(defaults["recipe"]), defaults["settings"], tokens), 3)
    record(defaults)
    record(run_baseline(args.config, model, data, work))
    if "error" not in defaults:
        record(run_floor(args.config, model, data, work, defaults))
    if args.ablate:
        kind = "gpu" if torch.cuda.is_available() else "cpu"
        for label, sets in ABLATIONS[kind]:
            record(run_peftcli(args.config, model, data, work, f"peftcli, {label}", sets))
    markdown = table(rows)
    print(markdown)
    if "error" not in defaults:
        print(fit_line(defaults))
    print(f"written to {path}")
    if args.update_docs:
        update_docs(args.config, markdown)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
