#!/usr/bin/env python3
"""peftcli vs the plain TRL script, side by side, in one invocation (`make bench`).

    python scripts/bench.py [--config cpu|llama-1b|llama-8b] [--steps N] [--ablate] [--keep]

Builds a random-init model of the chosen shape (no hub needed) and a synthetic chat dataset whose
lengths spread like real chat data (log-normal: many short turns, a long tail up to max_length),
then trains it for the same steps with the same batch, learning rate, max length and LoRA settings
twice: with scripts/baseline_trl.py (TRL's documented SFTTrainer + LoraConfig, defaults) and with
`peftcli train` (its defaults). Prints tokens/s, wall time, peak memory and final loss with the
peftcli/baseline ratios, the fit estimate against the measured peak, and writes everything as JSON
(device, versions, commit) under benchmarks/results/. `--ablate` adds peftcli runs with each fast
default switched off (or on) to show what each one is worth.

Ratios are only meaningful within one invocation: the runs share the machine, model and data.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

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
ABLATIONS = {
    "cpu": [("packing on", ["data.packing=true"]), ("checkpointing on", ["training.gradient_checkpointing=true"])],
    "gpu": [
        ("packing off", ["data.packing=false"]),
        ("liger off", ["training.liger=false"]),
        ("checkpointing off", ["training.gradient_checkpointing=false"]),
        ("tf32 off", ["training.tf32=false"]),
        ("compile on", ["training.compile=true"]),
    ],
}


def synthetic_rows(n: int, max_length: int, seed: int = 0) -> list[dict]:
    """Chat rows of pseudo-words; prompt and reply lengths are log-normal (median ~40 and ~120 words)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "di", "fe", "go", "hu"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(2000)]
    budget = int(max_length * 0.55)  # words; ~1.5 tokens each with the chat markers, so rows fit or just overflow

    def text(median: float, sigma: float) -> str:
        count = max(1, min(budget, int(rng.lognormvariate(math.log(median), sigma))))
        return " ".join(rng.choice(words) for _ in range(count))

    return [
        {"messages": [{"role": "user", "content": text(40, 0.8)}, {"role": "assistant", "content": text(120, 0.9)}]}
        for _ in range(n)
    ]


def build_assets(name: str, work: Path) -> tuple[Path, Path]:
    """The random-init model (+ tokenizer) and the training data for a config, built once per work dir."""
    config = CONFIGS[name]
    model_dir, data = work / "model", work / "train.jsonl"
    if (model_dir / "config.json").exists() and data.exists():
        return model_dir, data
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    work.mkdir(parents=True, exist_ok=True)
    rows = synthetic_rows(config["batch_size"] * config["steps"] * 3, config["max_length"])
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        (m["content"] for r in rows for m in r["messages"]),
        trainers.BpeTrainer(
            vocab_size=min(config["vocab"], 8192),
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tokenizer.save_pretrained(model_dir)

    shape = LlamaConfig(
        vocab_size=max(config["vocab"], len(tokenizer)),
        max_position_embeddings=8192,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config["shape"],
    )
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(shape, dtype=dtype)
    model.save_pretrained(model_dir)
    del model
    return model_dir, data


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


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - started, proc


def run_baseline(name: str, model: Path, data: Path, work: Path) -> dict:
    config = CONFIGS[name]
    result = work / "baseline.json"
    shutil.rmtree(work / "baseline", ignore_errors=True)
    command = [
        PYTHON,
        str(ROOT / "scripts" / "baseline_trl.py"),
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(work / "baseline"),
        "--result",
        str(result),
        "--steps",
        str(config["steps"]),
        "--batch-size",
        str(config["batch_size"]),
        "--lr",
        str(LEARNING_RATE),
        "--max-length",
        str(config["max_length"]),
        "--r",
        str(LORA["r"]),
        "--alpha",
        str(LORA["alpha"]),
    ]
    wall, proc = timed(command + (["--qlora"] if config["quantize"] else []))
    if proc.returncode != 0:
        raise SystemExit(f"baseline failed:\n{proc.stderr[-3000:]}")
    return {"run": "baseline (TRL docs script)", "wall_s": wall, **json.loads(result.read_text())}


def run_peftcli(name: str, model: Path, data: Path, work: Path, label: str, overrides: list[str]) -> dict:
    import yaml

    slug = label.replace(" ", "-")
    out = work / f"peftcli-{slug}"
    recipe = work / f"{slug}.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(name, model, data, out)), encoding="utf-8")
    sets = [item for o in overrides for item in ("--set", o)]
    wall, proc = timed([PYTHON, "-m", "peftcli", "train", str(recipe), "--overwrite", *sets])
    if proc.returncode != 0:
        return {"run": label, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "run": label,
        "wall_s": wall,
        **{
            k: metrics.get(k)
            for k in (
                "train_runtime_s",
                "train_tokens",
                "train_tokens_per_s",
                "peak_memory_mb",
                "peak_memory_kind",
                "train_loss",
                "mfu",
                "tflops",
                "settings",
            )
        },
        "recipe": str(recipe),
        "overrides": overrides,
    }


def fit_estimate(name: str, recipe_file: Path, settings: dict) -> float:
    from peftcli.fit import estimate
    from peftcli.modeling import read_config
    from peftcli.recipe import load_recipe

    recipe = load_recipe(recipe_file)
    return estimate(recipe, read_config(recipe.model), checkpointing=settings.get("gradient_checkpointing")).total_gib


def table(rows: list[dict], baseline: dict) -> str:
    head = (
        "| run | tokens/s | wall (s) | train (s) | peak memory (MiB) | final loss | tokens/s ratio | "
        "wall ratio | memory ratio |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['run']} | failed: {row['error']} |" + " |" * 7)
            continue
        ratios = " | ".join(f"{row[k] / baseline[k]:.2f}x" for k in ("train_tokens_per_s", "wall_s", "peak_memory_mb"))
        lines.append(
            f"| {row['run']} | {row['train_tokens_per_s']:,.0f} | {row['wall_s']:.1f} | "
            f"{row['train_runtime_s']:.1f} | {row['peak_memory_mb']:,.0f} | {row['train_loss']:.4f} | {ratios} |"
        )
    return "\n".join(lines)


def environment() -> dict:
    import torch

    from peftcli.report import versions

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


def update_readme(config: str, markdown: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = f"<!-- bench:{config} -->", f"<!-- /bench:{config} -->"
    if start not in text or end not in text:
        print(f"README has no {start} ... {end} markers; not updated", file=sys.stderr)
        return
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    readme.write_text(f"{before}{start}\n{markdown}\n{end}{after}", encoding="utf-8")
    print(f"README table for {config} updated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(CONFIGS), default="cpu")
    parser.add_argument("--steps", type=int, help="override the config's steps")
    parser.add_argument("--ablate", action="store_true", help="also run peftcli with each fast default flipped")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    parser.add_argument("--keep", action="store_true", help="keep the model, data and runs in --work")
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="replace the README's table for this config (between <!-- bench:CONFIG --> markers)",
    )
    args = parser.parse_args()
    import torch

    if args.config != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"--config {args.config} needs a CUDA GPU; use --config cpu here")
    if args.steps:
        CONFIGS[args.config]["steps"] = args.steps
    work = args.work / args.config
    model, data = build_assets(args.config, work)
    print(
        f"bench {args.config}: {CONFIGS[args.config]['steps']} steps, batch {CONFIGS[args.config]['batch_size']},"
        f" max_length {CONFIGS[args.config]['max_length']}; model and data in {work}",
        file=sys.stderr,
    )

    baseline = run_baseline(args.config, model, data, work)
    rows = [baseline, run_peftcli(args.config, model, data, work, "peftcli (defaults)", [])]
    if args.ablate:
        kind = "gpu" if torch.cuda.is_available() else "cpu"
        rows += [
            run_peftcli(args.config, model, data, work, f"peftcli, {label}", sets) for label, sets in ABLATIONS[kind]
        ]
    peft_row = rows[1]
    if "error" not in peft_row:
        peft_row["fit_estimate_gib"] = round(
            fit_estimate(args.config, Path(peft_row["recipe"]), peft_row["settings"] or {}), 3
        )
    result = {"config": args.config, **CONFIGS[args.config], **environment(), "rows": rows}
    markdown = table(rows, baseline)
    print(markdown)
    if "error" not in peft_row:
        measured = peft_row["peak_memory_mb"] / 1024
        kind = peft_row["peak_memory_kind"]
        if kind == "cuda_allocated":
            print(
                f"fit estimate {peft_row['fit_estimate_gib']:.2f} GiB vs measured {measured:.2f} GiB "
                f"({100 * (peft_row['fit_estimate_gib'] / measured - 1):+.0f} %)"
            )
        else:
            print(
                f"fit estimate {peft_row['fit_estimate_gib']:.2f} GiB (a GPU figure; on CPU the measured peak is "
                f"the process's resident memory, {measured:.2f} GiB, which is not comparable)"
            )
        if peft_row.get("mfu") is not None:
            print(f"peftcli MFU {100 * peft_row['mfu']:.1f} % ({peft_row['tflops']:.1f} TFLOP/s)")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    slug = result["device"].split(" (")[0].replace(" ", "-")
    path = out / f"{args.config}-{slug}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({**result, "table": markdown}, indent=2) + "\n", encoding="utf-8")
    print(f"written to {path.relative_to(ROOT)}")
    if args.update_readme:
        update_readme(args.config, markdown)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
