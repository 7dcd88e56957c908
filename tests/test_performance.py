"""Performance and scale: instant front-end commands, the fit estimate, the auto settings, MFU in
metrics, the multi-process launcher, and DDP on CPU matching a single process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import DEMO_TRAIN, ROOT, base_recipe, read_json, write_recipe

from peftcli.model.known_shapes import LLAMA_3_1_8B, QWEN2_5_0_5B
from peftcli.recipe import load_recipe

# The shapes the tool ships for its recipes' hub models (config.json as published).
LLAMA_8B = {k: v for k, v in LLAMA_3_1_8B.items() if k != "max_position_embeddings"}
QWEN_05B = {k: v for k, v in QWEN2_5_0_5B.items() if k != "max_position_embeddings"}


@pytest.mark.parametrize("command", [["--help"], ["validate", "{recipe}"], ["methods"]])
@pytest.mark.slow
def test_front_end_commands_never_import_torch(command, tmp_path, tiny_model):
    recipe = write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run"))
    argv = [a.format(recipe=recipe) for a in command]
    code = (
        "import sys; from peftcli.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "sys.exit(3 if 'torch' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-500:])


HEAVY = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "numpy",
    "pyarrow",
    "matplotlib",
    "pydantic",
    "yaml",
)


def test_help_imports_only_the_command_line():
    """`peftcli --help` is fast because of what it does not import (counted, not timed: a wall-clock
    threshold fails on a busy machine)."""
    code = (
        "import sys\nfrom peftcli.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = result.stdout.split()
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]
    # The cli package, what reports errors, and the launcher's stop recorder (stdlib only), installed
    # first thing so that a stop request during start-up is kept.
    light = {"peftcli.console", "peftcli.errors", "peftcli.interruption", "peftcli.training", "peftcli.training.launch"}
    ours = {m for m in loaded if m.startswith("peftcli.") and not m.startswith("peftcli.cli")}
    assert ours <= light, ours - light


def _meta_model(config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))


@pytest.mark.parametrize("config", [LLAMA_8B, QWEN_05B], ids=["llama-8b", "qwen2.5-0.5b"])
@pytest.mark.slow
def test_fit_estimate_counts_parameters_like_the_real_model(config, tmp_path):
    from peft import LoraConfig, get_peft_model

    from peftcli.model.size import Shape, trainable_params

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    recipe = load_recipe(
        write_recipe(
            tmp_path / "r.yaml",
            {
                "model": {"name": str(tmp_path / "m")},
                "data": {"train": "x.jsonl"},
                "peft": {"method": "lora", "r": 16, "target_modules": "all-linear"},
            },
        )
    )
    shape = Shape.from_config(config)
    model = _meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    bias = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))  # qwen2's q/k/v biases
    assert shape.linear_params() + shape.other_params() == total - bias
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert trainable_params(recipe.peft, shape) == peft_model.get_nb_trainable_parameters()[0]


def test_fit_estimate_for_8b_qlora_and_validate_prints_it(tmp_path, cli):
    from peftcli.model.size import estimate

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA_8B))
    (tmp_path / "m" / "tokenizer.json").write_text("{}")  # validate checks that a tokenizer is there
    path = write_recipe(
        tmp_path / "r.yaml",
        {
            "model": {"name": str(tmp_path / "m")},
            "quantization": {"bits": 4},
            "data": {"train": str(DEMO_TRAIN), "max_length": 2048},  # validate reads it
            "peft": {"method": "lora", "r": 16},
            "training": {"batch_size": 1, "gradient_checkpointing": True},
        },
    )
    guess = estimate(load_recipe(path), LLAMA_8B, checkpointing=True)
    # 7.0B linear weights at ~0.52 byte + 1.05B embedding/head that peft's k-bit preparation keeps in fp32
    assert 7.0 < guess.weights_gib < 7.6 and guess.trainable_params == 41_943_040
    assert guess.total_gib < 12  # the QLoRA-8B-at-batch-1 target
    full = estimate(load_recipe(path), LLAMA_8B, checkpointing=False)
    assert full.activations_gib > 5 * guess.activations_gib  # checkpointing is what keeps activations small
    result = cli("validate", path)
    assert result.code == 0 and "fit estimate (GPU" in result.err and "GiB peak" in result.err
    assert "8,030.3M in the base, 41.943M trainable" in result.err


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _bench_recipe(tmp_path, name: str, **training):
    """The recipe scripts/bench.py trains for config `name`, on a config.json of that shape."""
    from transformers import LlamaConfig

    bench = _bench()
    config = bench.CONFIGS[name]
    model = tmp_path / name
    model.mkdir()
    shape = LlamaConfig(vocab_size=config["vocab"], **config["shape"]).to_dict()
    (model / "config.json").write_text(json.dumps(shape))
    recipe = bench.recipe_for(name, model, tmp_path / "train.jsonl", tmp_path / "run")
    recipe["training"].update(training)
    return load_recipe(write_recipe(tmp_path / f"{name}.yaml", recipe)), shape


# Peaks measured on one H200 (torch.cuda.max_memory_allocated, /work/shared/perf/gpu-h200-20261130.md)
# with the scripts/bench.py configs, padded batches. The tokens are those of the largest micro-batch
# those runs trained on (same data, sampler and seed, replayed on CPU): 8 x 943 for llama-1b (40
# steps of batch 8) and 519 for llama-8b (20 steps of batch 1).
MEASURED_PEAKS = [
    ("llama-1b", True, 8 * 943, 4197 / 1024),  # LoRA r16, checkpointing on
    ("llama-1b", False, 8 * 943, 14628 / 1024),  # LoRA r16, checkpointing off
    ("llama-8b", True, 519, 8823 / 1024),  # QLoRA nf4 r16, checkpointing on
]


@pytest.mark.parametrize(("name", "checkpointing", "tokens", "measured_gib"), MEASURED_PEAKS)
def test_fit_estimate_is_within_ten_percent_of_measured_peaks(name, checkpointing, tokens, measured_gib, tmp_path):
    from peftcli.model.size import estimate

    recipe, shape = _bench_recipe(tmp_path, name, gradient_checkpointing=checkpointing)
    guess = estimate(recipe, shape, checkpointing, tokens=tokens)
    assert guess.tokens_per_micro_batch == tokens and guess.checkpointing == checkpointing
    assert abs(guess.total_gib / measured_gib - 1) <= 0.10, (guess.describe(), measured_gib)


@pytest.mark.parametrize(
    ("name", "free_gib", "expected"),
    [("llama-1b", 139.0, False), ("llama-1b", 22.0, True), ("llama-8b", 139.0, False), ("llama-8b", 15.0, True)],
)
def test_auto_checkpointing_is_on_only_when_the_run_would_not_fit(name, free_gib, expected, tmp_path):
    """With `auto`, checkpointing (~35 % slower) is on only where the estimate without it does not fit."""
    from peftcli.model.size import estimate
    from peftcli.training import settings

    recipe, shape = _bench_recipe(tmp_path, name)
    need = estimate(recipe, shape, checkpointing=False).total_gib  # full packed rows, no checkpointing
    chosen = settings.resolve(recipe, cuda=True, capability=(9, 0), free_gib=free_gib)
    assert chosen.gradient_checkpointing is expected, (need, chosen.checkpointing_reason)
    assert (
        f"{need:.1f} GiB" in chosen.checkpointing_reason and f"{free_gib:.1f} GiB free" in chosen.checkpointing_reason
    )
    unknown = settings.resolve(recipe, cuda=True, capability=(9, 0), free_gib=None)
    assert unknown.gradient_checkpointing  # free memory unknown: the safe choice
    forced = recipe.model_copy(update={"training": recipe.training.model_copy(update={"gradient_checkpointing": True})})
    assert settings.resolve(forced, cuda=True, capability=(9, 0), free_gib=139.0).gradient_checkpointing


def test_auto_settings_are_fast_on_a_gpu_and_plain_on_cpu(tmp_path, tiny_model, monkeypatch):
    from peftcli.model import speed
    from peftcli.training import settings

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run")))
    cpu = settings.resolve(recipe, cuda=False)
    assert (cpu.packing, cpu.gradient_checkpointing, cpu.liger, cpu.tf32, cpu.attn_implementation) == (
        False,
        False,
        False,
        False,
        None,
    )
    monkeypatch.setattr(speed, "_installed", lambda name: True)  # flash-attn and liger-kernel present
    gpu = settings.resolve(recipe, cuda=True, capability=(9, 0), free_gib=79.0)
    assert gpu.attn_implementation == "flash_attention_2" and gpu.packing and gpu.packing_layout == "varlen"
    assert not gpu.gradient_checkpointing  # a tiny model fits an 80 GiB card many times over
    assert gpu.liger and gpu.tf32 and not gpu.compile
    monkeypatch.setattr(speed, "_installed", lambda name: False)
    plain = settings.resolve(recipe, cuda=True, capability=(7, 5), free_gib=15.0)
    assert plain.attn_implementation == "sdpa" and plain.packing_layout == "rows" and not plain.tf32
    assert not plain.liger
    prefix = recipe.model_copy(
        update={
            "peft": load_recipe(
                write_recipe(
                    tmp_path / "p.yaml",
                    {**base_recipe(tiny_model, tmp_path / "run"), "peft": {"method": "prefix_tuning"}},
                )
            ).peft
        }
    )
    assert not settings.resolve(prefix, cuda=True, capability=(9, 0), free_gib=1.0).gradient_checkpointing
    explicit = recipe.model_copy(
        update={"training": recipe.training.model_copy(update={"gradient_checkpointing": True, "liger": False})}
    )
    chosen = settings.resolve(explicit, cuda=False)
    assert chosen.gradient_checkpointing and not chosen.liger


@pytest.mark.slow
def test_metrics_carry_throughput_and_utilisation(tmp_path, tiny_model):
    from peftcli.model.device import peak_tflops
    from peftcli.training.run import run_training

    outcome = run_training(
        load_recipe(
            write_recipe(tmp_path / "r.yaml", base_recipe(tiny_model, tmp_path / "run", training={"max_steps": 3}))
        )
    )
    metrics = read_json(outcome.run_dir / "metrics.json")
    assert metrics["tokens_per_s_per_device"] == metrics["train_tokens_per_s"]  # one process
    # LoRA counts 4 FLOPs per matmul parameter per token (forward 2, backward through activations 2);
    # the input embedding is a lookup, not a matmul.
    model = outcome.model
    matmul = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    assert metrics["flops_per_token"] == 4 * matmul
    assert metrics["train_tokens_per_s"] == pytest.approx(
        metrics["train_tokens"] / metrics["train_runtime_s"], rel=0.01
    )
    expected = metrics["tokens_per_s_per_device"] * metrics["flops_per_token"] / 1e12
    assert metrics["tflops"] == pytest.approx(expected, abs=1e-3)
    assert metrics["mfu"] is None and metrics["device_peak_tflops"] is None  # no peak figure for a CPU
    assert metrics["settings"]["packing"] is False
    assert "TFLOP/s per device" in (outcome.run_dir / "report.md").read_text()
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("Some Future GPU") is None


def test_launcher_environments_and_commands(monkeypatch):
    from peftcli.errors import UserError
    from peftcli.training.launch import accelerate_command, process_environments

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    envs = process_environments(2, gpus=0)
    assert [e["RANK"] for e in envs] == ["0", "1"] and [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"2"} and len({e["MASTER_PORT"] for e in envs}) == 1
    assert int(envs[0]["OMP_NUM_THREADS"]) >= 1  # CPU cores shared, not oversubscribed
    with pytest.raises(UserError, match="has 2 usable GPU"):
        process_environments(4, gpus=2)
    fsdp = accelerate_command(["train", "r.yaml"], 2, Path("recipes/accelerate/fsdp.yaml"))
    assert fsdp[fsdp.index("--config_file") + 1] == "recipes/accelerate/fsdp.yaml"
    assert fsdp[fsdp.index("--num_processes") + 1] == "2" and fsdp[-3:] == ["peftcli", "train", "r.yaml"]


def test_accelerate_configs_are_valid_yaml():
    import yaml

    for path in sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        assert config["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED"), path


@pytest.mark.slow
def test_ddp_on_cpu_matches_a_single_process(tmp_path, tiny_model, cli):
    """Two gloo processes with batch 8 each = one process with batch 16: same losses, one adapter."""
    single = write_recipe(
        tmp_path / "single.yaml",
        base_recipe(tiny_model, tmp_path / "single", training={"max_steps": 8, "batch_size": 16}),
    )
    assert cli("train", single).code == 0
    ddp = write_recipe(
        tmp_path / "ddp.yaml", base_recipe(tiny_model, tmp_path / "ddp", training={"max_steps": 8, "batch_size": 8})
    )
    result = subprocess.run(
        [sys.executable, "-m", "peftcli", "train", str(ddp), "--num-processes", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run written to") == 1  # rank 0 alone reports and writes
    run = tmp_path / "ddp"
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert len(list(run.glob("adapter*"))) == 1 and not list(run.glob(".tmp-*"))
    a, b = read_json(run / "metrics.json"), read_json(tmp_path / "single" / "metrics.json")
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert a["train_tokens"] == b["train_tokens"]  # aggregated over both processes
    for x, y in zip(a["loss_history"], b["loss_history"], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3)


def test_bench_data_spreads_like_chat(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.synthetic_rows(400, max_length=512)
    lengths = sorted(len(r["messages"][1]["content"].split()) for r in rows)
    assert lengths[len(lengths) // 2] < 200 and lengths[-1] > 2 * lengths[len(lengths) // 2]  # long tail


def test_mfu_counts_4bit_weights_at_their_real_number(tiny_model):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peftcli.model.device import matmul_params

    full = AutoModelForCausalLM.from_pretrained(tiny_model)
    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_model,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        dtype=torch.float32,
    )
    assert matmul_params(quantized) == matmul_params(full)


@pytest.mark.slow
def test_ddp_interrupt_and_resume(tmp_path, tiny_model):
    """SIGTERM to the launcher: every process stops after the same step, one checkpoint, exit 143;
    --resume with the same processes finishes the run."""
    import os
    import signal

    recipe = base_recipe(tiny_model, tmp_path / "run", training={"max_steps": 48, "batch_size": 8, "save_steps": 10000})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    process = subprocess.Popen(
        [sys.executable, "-m", "peftcli", "train", str(path), "--num-processes", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.time() + 120
    while time.time() < deadline and "training: step" not in process.stderr.readline():
        pass
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert err.count("interrupted: stopped after step") == 1 and "Traceback" not in err
    checkpoints = list((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    assert {p.name for p in checkpoints[0].glob("rng_state_*.safetensors")} == {
        "rng_state_0.safetensors",
        "rng_state_1.safetensors",
    }
    metrics = read_json(tmp_path / "run" / "metrics.json")
    step = metrics["steps"]
    assert metrics["status"] == "interrupted" and checkpoints[0].name == f"checkpoint-{step}"
    assert step < 48
    resumed = subprocess.run(
        [sys.executable, "-m", "peftcli", "train", str(path), "--num-processes", "2", "--resume"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_json(tmp_path / "run" / "metrics.json")["steps"] == 48


def test_steady_state_leaves_the_warm_up_steps_out():
    """The bench's steady tokens/s is what a long run sees: slow first steps (allocator, autotuning,
    compilation) do not drag it down; the end-to-end figure keeps them."""
    from peftcli.training.trainer import steady_state

    ends, t = [], 0.0
    for step in range(40):
        t += 5.0 if step < 2 else 0.5  # two slow warm-up steps, then 0.5 s per 1,000 tokens
        ends.append(t)
    steady = steady_state(ends, [1000] * 40, [24] * 40)
    assert steady.warmup_steps == 4 and steady.tokens_per_s == pytest.approx(2000.0)
    assert steady.step_time_s == pytest.approx(0.5) and steady.largest_step_tokens == 1024
    assert 40 * 1000 / ends[-1] < 0.7 * steady.tokens_per_s  # end to end, warm-up included
    assert steady_state(ends[:3], [1000] * 3, [0] * 3) is None  # too short to tell
