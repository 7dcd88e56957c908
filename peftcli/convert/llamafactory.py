"""A LLaMA-Factory training config (`llamafactory-cli train config.yaml`) -> a peftcli recipe, and
`--data-only`: the `data:` section for some dataset_info.json entries.

The config's `dataset:` names entries of dataset_info.json (llamafactory_data.py); the rest are
Hugging Face Trainer arguments and LLaMA-Factory's model/method arguments, carried key by key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftcli.convert import llamafactory_data as lf_data
from peftcli.convert.common import (
    COMMON_REASONS,
    COMMON_SAME,
    carry_dtype,
    carry_model_name,
    carry_optimizer,
    carry_scheduler,
    carry_trainer_keys,
    carry_warmup_steps,
    finish,
    names,
    number,
)
from peftcli.convert.ledger import Ledger, read_config
from peftcli.convert.sources import chat_template
from peftcli.errors import UserError
from peftcli.methods import DEFAULT_METHOD, REGISTRY

TOOL = "LLaMA-Factory"
STAGES = ("sft", "pt")  # supervised fine-tuning and plain-text training; rm/ppo/dpo/kto are not SFT
# A pt run cuts the documents into cutoff_len-token blocks, every token trained: data.overlong: split.
PT_BLOCKS = (
    "stage: pt -> data.overlong: split (every document longer than cutoff_len is cut into cutoff_len-token "
    "blocks, every token trained; LLaMA-Factory also joins documents across block boundaries and drops the "
    "last partial block of the stream, peftcli keeps each document's blocks apart and keeps its last one)"
)
# LLaMA-Factory's own defaults (and the Trainer's) where they differ from peftcli's; written when
# the config leaves the key out, so the recipe trains what LLaMA-Factory would have.
DEFAULTS = {
    "cutoff_len": (2048, "data.max_length"),
    "num_train_epochs": (3.0, "training.epochs"),
    "learning_rate": (5e-5, "training.learning_rate"),
    "per_device_train_batch_size": (8, "training.batch_size"),
}
LORA_DROPOUT = 0.0  # LLaMA-Factory's default; its lora_alpha defaults to twice the rank
# Method keys -> the chosen method's keys (carried only when that method has the key).
PEFT_KEYS = {
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "use_dora": "use_dora",
    "use_rslora": "use_rslora",
    "freeze_trainable_layers": "layers",
}
# Attention names -> model.attn_implementation (fa2 is what peftcli's auto picks where installed).
ATTENTION = {"auto": "auto", "fa2": "auto", "sdpa": "sdpa", "disabled": "eager"}
REPORTERS = ("tensorboard", "wandb", "mlflow")
REASONS = {
    **COMMON_REASONS,
    "adapter_name_or_path": "peftcli trains a new adapter; it does not continue from one",
    "create_new_adapter": "peftcli trains a new adapter; it does not continue from one",
    "max_samples": "peftcli reads every row; cut the data file instead",
    "overwrite_cache": "peftcli prepares the data on every run; nothing is cached",
    "preprocessing_num_workers": "peftcli prepares data in one process",
    "dataloader_num_workers": "peftcli sets the data loader up itself",
    "tokenized_path": "peftcli prepares the data on every run; nothing is cached",
    "plot_loss": "peftcli always writes loss.png into the run directory",
    "overwrite_output_dir": "peftcli refuses to overwrite a run it did not write; pick a new output.dir",
    "save_only_model": "peftcli's checkpoints keep the optimizer state, for --resume",
    "mix_strategy": "peftcli mixes sources by concatenation (or per-source weight)",
    "interleave_probs": "set a weight on each source in data.train instead",
    "streaming": "peftcli reads the data in full",
    "pissa_iter": "peftcli runs PiSSA's full SVD",
    "loraplus_lr_ratio": "peftcli trains LoRA with one learning rate",
    "use_unsloth": "peftcli has its own speed-ups (training.liger, packing)",
    "rope_scaling": "peftcli uses the model's own position settings",
    "neat_packing": "peftcli packs without cross-attention always",
    "pissa_convert": "peftcli always saves a PiSSA adapter converted to plain LoRA",
    "freeze_extra_modules": "peft.method freeze trains the last layers (and the head with train_head)",
    "freeze_trainable_modules": "peft.method freeze trains whole layers",
    "cache_dir": "set HF_HOME in the environment",
    "hf_hub_token": "set HF_TOKEN in the environment",
    "ms_hub_token": "peftcli reads the Hugging Face hub only",
    "use_fast_tokenizer": "peftcli loads the fast tokenizer where there is one",
    "pure_bf16": "peftcli keeps the trainable weights in float32 (model.dtype for the rest)",
    "save_strategy": "peftcli saves every training.save_steps steps",
    "predict_with_generate": "use `peftcli eval RUN --generate`",
}
DEFAULT_REASON = "peftcli has no equivalent"
SAME = {**COMMON_SAME, "stage": "sft", "neat_packing": True, "pissa_convert": True}


def _info_path(ledger: Ledger, override: Path | None) -> Path | None:
    """Where dataset_info.json is: --dataset-info, else dataset_dir (default data/, relative to the
    config's folder); None when dataset_dir is ONLINE (the names are hub ids)."""
    folder = ledger.take("dataset_dir", "data")
    if override is not None:
        if ledger.given("dataset_dir"):
            ledger.drop("dataset_dir", folder, "--dataset-info names the dataset_info.json to read")
        return override
    if ledger.given("dataset_dir"):
        ledger.mark("dataset_dir")  # it places the data files, whose paths the recipe holds
    if folder == "ONLINE":
        return None
    if str(folder).startswith("REMOTE:"):
        raise UserError(
            f"dataset_dir: {folder} is a hub repository",
            hint=f"download its {lf_data.INFO_FILE} and pass --dataset-info",
        )
    found = ledger.find(folder)
    return (found or ledger.origin.parent / folder) / lf_data.INFO_FILE


def _read_info(path: Path | None) -> dict | None:
    if path is None:
        return None
    if not path.exists():
        raise UserError(
            f"{lf_data.INFO_FILE} not found: {path}",
            hint="pass --dataset-info PATH, or set dataset_dir in the config (relative to its folder)",
        )
    return lf_data.read_info(path)


def convert(config_path: Path, out: Path | None, info: Path | None = None) -> Ledger:
    ledger = Ledger(TOOL, read_config(config_path), config_path, out)
    stage = ledger.config.get("stage") or "sft"
    if stage not in STAGES:
        raise UserError(
            f"{config_path}: stage: {stage} is not supervised fine-tuning",
            hint="peftcli trains stage sft (and pt, plain text) only; rm/ppo/dpo/kto are not converted",
        )
    if stage == "pt":
        ledger.take("stage")
        ledger.change("stage: pt -> every dataset as format: text (all of its tokens trained)")
    _model(ledger)
    _method(ledger)
    _data(ledger, stage, info)
    if stage == "pt":
        _pretraining_blocks(ledger)
    _training(ledger)
    finish(ledger, "cutoff_len")
    ledger.leftovers(REASONS, DEFAULT_REASON, SAME)
    return ledger


def data_only(info: Path | None, wanted: str | None, out: Path | None, config_path: Path | None) -> Ledger:
    """The `data:` section for the entries named by --dataset (or the config's dataset:)."""
    config = read_config(config_path) if config_path is not None else {}
    origin = config_path or info or Path("data") / lf_data.INFO_FILE
    ledger = Ledger(TOOL, config, origin, out)
    path = _info_path(ledger, info) if config_path is not None else (info or origin)
    stage = config.get("stage", "sft")
    wanted = wanted or config.get("dataset")
    if not wanted:
        raise UserError("--data-only needs the dataset names", hint="pass --dataset NAME[,NAME]")
    train = lf_data.sources(ledger, "--dataset", wanted, _read_info(path), path, stage)
    if not train:
        raise UserError("--dataset: nothing left to train on", hint="the entries above were left out")
    ledger.put("data.train", train)
    ledger.mark("dataset")
    _text_split(ledger)
    return ledger


def _model(ledger: Ledger) -> None:
    carry_model_name(ledger, "model_name_or_path", "name the base model with it")
    revision = ledger.take("model_revision")
    if revision not in (None, "main"):
        ledger.carry("model_revision", "model.revision", revision)
    if ledger.given("trust_remote_code"):
        ledger.carry("trust_remote_code", "model.trust_remote_code", ledger.take("trust_remote_code"))
    attention = ledger.take("flash_attn")
    if attention == "fa2":
        ledger.change("flash_attn: fa2 -> model.attn_implementation: auto (flash-attn where it is installed on a GPU)")
    elif attention in ATTENTION:
        ledger.carry("flash_attn", "model.attn_implementation", ATTENTION[attention])
    elif attention is not None:
        ledger.drop("flash_attn", attention, "model.attn_implementation takes auto, sdpa, eager or flash-attn")
    carry_dtype(ledger, ledger.take("bf16"), ledger.take("fp16"))
    for key in ("tf32", "enable_liger_kernel"):
        value = ledger.take(key)
        if isinstance(value, bool):
            ledger.carry(key, "training.tf32" if key == "tf32" else "training.liger", value)
    _quantization(ledger)


def _quantization(ledger: Ledger) -> None:
    bits = number(ledger.take("quantization_bit"))
    method = ledger.take("quantization_method", "bnb")
    if bits is None:
        return
    if method not in ("bnb", "bitsandbytes"):
        ledger.drop("quantization_bit", bits, f"quantization_method {method}: peftcli quantizes with bitsandbytes")
        return
    if ledger.carry("quantization_bit", "quantization.bits", bits) and bits == 4:
        if ledger.given("quantization_type"):
            ledger.carry("quantization_type", "quantization.quant_type", ledger.take("quantization_type"))
        if ledger.given("double_quantization"):
            ledger.carry("double_quantization", "quantization.double_quant", ledger.take("double_quantization"))


def _method(ledger: Ledger) -> None:
    # LLaMA-Factory names its methods as peftcli does, and defaults to LoRA, as peftcli does
    # (tests/test_convert.py checks that a config without finetuning_type still becomes LoRA).
    kind = ledger.take("finetuning_type", DEFAULT_METHOD)
    if kind not in REGISTRY:
        raise UserError(
            f"{ledger.origin}: finetuning_type: {kind} has no peftcli equivalent", hint="see `peftcli methods`"
        )
    ledger.put("peft.method", kind)
    ledger.mark("finetuning_type")
    keys = REGISTRY[kind].keys()
    for key, peft_key in PEFT_KEYS.items():
        value = number(ledger.take(key))
        if value is not None:
            if key == "freeze_trainable_layers" and isinstance(value, int) and value < 0:
                ledger.drop(key, value, "peft.layers counts from the last layer; the first layers cannot be chosen")
            else:
                ledger.peft_key(key, peft_key, value)
    if "alpha" in keys and ledger.get("peft.alpha") is None and not ledger.given("lora_alpha"):
        ledger.fill("lora_alpha", 2 * (ledger.get("peft.r") or keys["r"]), "peft.alpha")
    if "dropout" in keys and ledger.get("peft.dropout") is None and not ledger.given("lora_dropout"):
        ledger.fill("lora_dropout", LORA_DROPOUT, "peft.dropout")
    target = ledger.take("lora_target")
    if target is not None:
        targets = names(target)
        ledger.peft_key("lora_target", "target_modules", "all-linear" if targets == ["all"] else targets)
    extra = ledger.take("additional_target")
    if extra is not None:
        ledger.peft_key("additional_target", "modules_to_save", names(extra))
    if ledger.take("pissa_init") is True:
        ledger.peft_key("pissa_init", "init", "pissa")


def _data(ledger: Ledger, stage: str, override: Path | None) -> None:
    wanted = ledger.take("dataset")
    if wanted is None:
        raise UserError(f"{ledger.origin}: dataset is missing", hint="name the training data: dataset: name[,name]")
    path = _info_path(ledger, override)
    info = _read_info(path)
    train = lf_data.sources(ledger, "dataset", wanted, info, path, stage)
    if not train:
        raise UserError(f"{ledger.origin}: dataset: nothing left to train on", hint="the entries above were left out")
    ledger.carry("dataset", "data.train", train)
    evals = ledger.take("eval_dataset")
    if evals is not None:
        ledger.carry("eval_dataset", "data.eval", lf_data.sources(ledger, "eval_dataset", evals, info, path, stage))
    split = number(ledger.take("val_size"))
    if split:
        if evals is not None:
            ledger.drop("val_size", split, "eval_dataset is the eval data")
        elif isinstance(split, float) and 0 < split < 1:
            ledger.carry("val_size", "data.eval_split", split)
        else:
            ledger.drop("val_size", split, "a number of rows; data.eval_split takes a fraction of the data")
    _text_split(ledger)
    if ledger.given("packing"):
        ledger.carry("packing", "data.packing", ledger.take("packing"))
    if ledger.take("train_on_prompt") is True:
        ledger.carry("train_on_prompt", "data.train_on", "all")
    if ledger.take("mask_history") is True:
        if ledger.get("data.train_on") is None:
            ledger.carry("mask_history", "data.train_on", "last_turn")
        else:
            ledger.drop("mask_history", True, "train_on_prompt trains everything")
    chat_template(ledger, "template", ledger.take("template"))


def _pretraining_blocks(ledger: Ledger) -> None:
    """stage: pt cuts the documents into blocks (its packing, on unless the config turns it off);
    with packing: false it truncates each document to cutoff_len, as data.overlong: truncate does."""
    if ledger.config.get("packing") is False:
        ledger.change("stage: pt with packing: false -> data.overlong: truncate (each document cut at cutoff_len)")
        return
    sources = [*(ledger.get("data.train") or []), *(ledger.get("data.eval") or [])]
    chats = [s["path"] for s in sources if s.get("format") != "text"]
    if chats:  # split refuses conversations; LLaMA-Factory would train their first message as text
        ledger.drop("stage", "pt", f"data.overlong: split cuts plain text only, and {chats[0]} is a conversation")
    elif ledger.carry("stage", "data.overlong", "split"):
        ledger.change(PT_BLOCKS)


def _text_split(ledger: Ledger) -> None:
    """LLaMA-Factory reads a .txt file one example per line."""
    if any(str(s["path"]).lower().endswith(".txt") for s in ledger.get("data.train") or []):
        ledger.put("data.text_split", "line")
        ledger.change("a .txt dataset -> data.text_split: line (LLaMA-Factory reads one example per line)", "dataset")


def _training(ledger: Ledger) -> None:
    for key, (value, target) in DEFAULTS.items():
        if ledger.given(key):
            ledger.carry(key, target, number(ledger.take(key)))
        elif key != "num_train_epochs" or not ledger.given("max_steps"):
            ledger.take(key)
            ledger.fill(key, value, target)
    steps = number(ledger.take("max_steps"))
    if isinstance(steps, int) and steps > 0:
        ledger.carry("max_steps", "training.max_steps", steps)
    carry_trainer_keys(ledger)
    carry_scheduler(ledger, "lr_scheduler_type")
    carry_optimizer(ledger, "optim")
    carry_warmup_steps(ledger, "warmup_steps")
    if ledger.take("disable_gradient_checkpointing") is True:
        ledger.carry("disable_gradient_checkpointing", "training.gradient_checkpointing", False)
    elif isinstance(ledger.config.get("gradient_checkpointing"), bool):
        ledger.carry("gradient_checkpointing", "training.gradient_checkpointing", ledger.take("gradient_checkpointing"))
    strategy = ledger.take("eval_strategy")
    strategy = ledger.take("evaluation_strategy") if strategy is None else strategy  # its older name
    if strategy == "no" and ledger.get("training.eval_steps") is not None:
        ledger.retract("training.eval_steps", "eval_strategy is no")
    elif strategy not in (None, "no", "steps"):
        ledger.drop("eval_strategy", strategy, "peftcli evaluates every training.eval_steps steps")
    _report_to(ledger, ledger.take("report_to"))
    output = ledger.take("output_dir")
    if isinstance(output, str):
        ledger.carry("output_dir", "output.dir", ledger.for_recipe(ledger.origin.parent / output))


def _report_to(ledger: Ledger, value: Any) -> None:
    if value is None:
        return
    if value == "none" or value == ["none"]:
        ledger.carry("report_to", "training.report_to", [])
        return
    wanted = names(value)
    kept = [name for name in wanted if name in REPORTERS]
    if kept:
        ledger.carry("report_to", "training.report_to", kept)
    if len(kept) < len(wanted):
        others = [name for name in wanted if name not in REPORTERS]
        ledger.drop("report_to", others, f"training.report_to takes {', '.join(REPORTERS)}")
