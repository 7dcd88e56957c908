"""An Axolotl training config (`axolotl train config.yml`) -> a peftcli recipe.

Axolotl's keys are flat; each is carried to its recipe key, listed as not carried with what to do
instead, or (left empty in the config) listed as empty. Datasets are in axolotl_data.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftcli.convert import axolotl_data
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
from peftcli.convert.ledger import Ledger, full_finetune_method, read_config
from peftcli.convert.sources import model_path
from peftcli.errors import UserError
from peftcli.methods import REGISTRY

TOOL = "Axolotl"
# Axolotl's QLoRA is its LoRA adapter (the name after the "q") on a 4-bit base.
QLORA = "qlora"
# Axolotl's defaults where they differ from peftcli's, written when the config leaves the key out.
DEFAULT_MICRO_BATCH_SIZE = 1
DEFAULT_LORA_DROPOUT = 0.0
# Adapter keys -> the chosen method's keys (carried only when that method has the key).
PEFT_KEYS = {
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "peft_use_dora": "use_dora",
    "peft_use_rslora": "use_rslora",
    "lora_modules_to_save": "modules_to_save",
    "peft_layers_to_transform": "layers_to_transform",
}
# Attention settings that peftcli's `auto` covers: it picks flash-attn varlen where it is installed.
FLASH = ("flash_attention_2", "flash_attention_3")
REASONS = {
    **COMMON_REASONS,
    "evals_per_epoch": "peftcli evaluates every training.eval_steps steps; set that instead",
    "saves_per_epoch": "peftcli saves every training.save_steps steps; set that instead",
    "eval_sample_packing": "peftcli packs evaluation as it packs training (data.packing)",
    "pad_to_sequence_len": "peftcli pads a batch only to its longest example (or packs without padding)",
    "dataset_prepared_path": "peftcli prepares the data on every run; nothing is cached",
    "special_tokens": "peftcli keeps the tokenizer's tokens and sets a pad token when there is none",
    "tokens": "peftcli does not add tokens to the tokenizer",
    "loss_watchdog_threshold": "peftcli has no loss watchdog (a diverging loss shows in the progress line)",
    "loss_watchdog_patience": "peftcli has no loss watchdog (a diverging loss shows in the progress line)",
    "lora_model_dir": "peftcli trains a new adapter; it does not continue from one",
    "lora_fan_in_fan_out": "peftcli finds Conv1D layers (GPT-2) itself",
    "wandb_project": "set WANDB_PROJECT in the environment and training.report_to: [wandb]",
    "wandb_entity": "set WANDB_ENTITY in the environment and training.report_to: [wandb]",
    "wandb_name": "set WANDB_NAME in the environment",
    "wandb_watch": "peftcli does not watch gradients",
    "wandb_log_model": "peftcli does not upload models to W&B",
    "xformers_attention": "peftcli's attention kernels are eager, sdpa, flash-attn and torch varlen",
    "flex_attention": "peftcli's attention kernels are eager, sdpa, flash-attn and torch varlen",
    "default_system_message": "put the system prompt in the data (a system column or turn)",
    "strict": "peftcli refuses unknown recipe keys always",
    "gptq": "peftcli quantizes with bitsandbytes only (quantization.bits)",
    "unfrozen_parameters": "use peft.method freeze (the last N layers) or full",
    "group_by_length": "peftcli packs or pads per batch; no length grouping",
    "gradient_checkpointing_kwargs": "peftcli always uses non-reentrant checkpointing",
    "shuffle_merged_datasets": "peftcli always shuffles the training data (training.seed)",
    "dataset_processes": "peftcli prepares data in one process",
    "pretraining_dataset": "peftcli does not stream a pre-training dataset; list its files under datasets with "
    "type: completion (format: text, cut into sequence_len blocks with data.overlong: split)",
}
DEFAULT_REASON = "peftcli has no equivalent"


def convert(config_path: Path, out: Path | None) -> Ledger:
    ledger = Ledger(TOOL, read_config(config_path), config_path, out)
    if ledger.config.get("rl"):
        raise UserError(
            f"{config_path}: rl: {ledger.config['rl']} is preference/reinforcement training",
            hint="peftcli trains supervised fine-tuning only; convert an SFT config (no `rl:` key)",
        )
    _model(ledger)
    _method(ledger)
    axolotl_data.carry_data(ledger)
    _completion_chunks(ledger)
    _training(ledger)
    finish(ledger, "sequence_len")
    ledger.leftovers(REASONS, DEFAULT_REASON, {**COMMON_SAME, "strict": False})
    return ledger


def _completion_chunks(ledger: Ledger) -> None:
    """Axolotl cuts a completion (pre-training text) dataset's texts into sequence_len-token chunks,
    every token trained: data.overlong: split, which applies to every source and cuts plain text only."""
    chunked = [
        f"{key}[{index}]"
        for key in ("datasets", "test_datasets")
        for index, entry in enumerate(ledger.config.get(key) or [])
        if isinstance(entry, dict) and entry.get("type") == "completion"
    ]
    if not chunked:
        return
    sources = [*(ledger.get("data.train") or []), *(ledger.get("data.eval") or [])]
    others = [s["path"] for s in sources if s.get("format") != "text"]
    if others:
        ledger.drop(
            f"{chunked[0]}.type",
            "completion",
            f"Axolotl cuts completion text into sequence_len chunks; data.overlong: split would too, but it cuts "
            f"plain text only and {others[0]} is not: a text over data.max_length is truncated (train the text in "
            "a recipe of its own to keep every token)",
        )
        return
    ledger.put("data.overlong", "split")
    ledger.change(
        "type: completion -> data.overlong: split (a text longer than sequence_len is cut into sequence_len-token "
        "blocks, every token trained, as Axolotl chunks it)",
        chunked[0].split("[")[0],
    )


def _model(ledger: Ledger) -> None:
    base = carry_model_name(ledger, "base_model", "Axolotl configs name the model as base_model")
    config = ledger.take("base_model_config")
    if config is not None and config != base:
        ledger.drop("base_model_config", config, "peftcli reads the model's config from model.name")
    for key, target in (("revision_of_model", "model.revision"), ("trust_remote_code", "model.trust_remote_code")):
        if ledger.given(key):
            ledger.carry(key, target, ledger.take(key))
    tokenizer = ledger.take("tokenizer_config")
    if tokenizer is not None and tokenizer != base:
        ledger.carry("tokenizer_config", "model.tokenizer", model_path(ledger, "tokenizer_config", tokenizer))
    # peftcli loads every base with AutoModelForCausalLM and AutoTokenizer, which resolve these classes.
    model_type, tokenizer_type = ledger.take("model_type"), ledger.take("tokenizer_type")
    if model_type is not None and not str(model_type).endswith("ForCausalLM"):
        ledger.drop("model_type", model_type, "peftcli loads causal LMs with AutoModelForCausalLM")
    if tokenizer_type is not None and not str(tokenizer_type).endswith(("Tokenizer", "TokenizerFast")):
        ledger.drop("tokenizer_type", tokenizer_type, "peftcli loads the tokenizer with AutoTokenizer")
    _attention(ledger)
    carry_dtype(ledger, ledger.take("bf16"), ledger.take("fp16"))
    tf32 = ledger.take("tf32")
    if isinstance(tf32, bool):
        ledger.carry("tf32", "training.tf32", tf32)


def _attention(ledger: Ledger) -> None:
    chosen = ledger.take("attn_implementation")
    flash, sdp = ledger.take("flash_attention"), ledger.take("sdp_attention")
    if chosen in ("eager", "sdpa"):
        ledger.carry("attn_implementation", "model.attn_implementation", chosen)
    elif chosen in FLASH or (chosen is None and flash is True):
        key = "attn_implementation" if chosen else "flash_attention"
        ledger.change(
            f"{key}: {chosen or True} -> model.attn_implementation: auto (flash-attn where it is installed on a GPU)"
        )
    elif chosen is not None:
        ledger.drop("attn_implementation", chosen, "model.attn_implementation takes eager, sdpa or flash-attn")
    if sdp is True and chosen is None and flash is not True:
        ledger.carry("sdp_attention", "model.attn_implementation", "sdpa")


def _method(ledger: Ledger) -> None:
    adapter = ledger.take("adapter")
    if adapter is None:
        method = full_finetune_method()
        ledger.put("peft.method", method)
        ledger.change(f"adapter: none -> peft.method: {method} (Axolotl trains every weight)", "adapter")
    else:
        method = adapter[1:] if adapter == QLORA else str(adapter)
        if method not in REGISTRY:
            raise UserError(
                f"{ledger.origin}: adapter: {adapter} has no peftcli equivalent",
                hint="peftcli converts adapter: lora, qlora, or none (a full fine-tune); see `peftcli methods`",
            )
        ledger.put("peft.method", method)
        ledger.mark("adapter")
    _quantization(ledger, adapter)
    for key, peft_key in PEFT_KEYS.items():
        if ledger.given(key):
            value = ledger.take(key)
            ledger.peft_key(key, peft_key, number(value) if isinstance(value, str) else value)
        elif key == "lora_dropout" and adapter is not None and "dropout" in REGISTRY[method].keys():
            ledger.take(key)
            ledger.fill(key, DEFAULT_LORA_DROPOUT, "peft.dropout")
        else:
            ledger.take(key)
    _targets(ledger)
    _loftq(ledger)


def _targets(ledger: Ledger) -> None:
    linear, modules = ledger.take("lora_target_linear"), ledger.take("lora_target_modules")
    if linear is True:
        ledger.peft_key("lora_target_linear", "target_modules", "all-linear")
        if modules is not None:
            ledger.drop("lora_target_modules", modules, "lora_target_linear already targets every linear layer")
    elif modules is not None:
        if isinstance(modules, str) and not modules.replace("_", "").replace(".", "").isalnum():
            ledger.drop("lora_target_modules", modules, "a regular expression; peft.target_modules takes names")
        else:
            ledger.peft_key("lora_target_modules", "target_modules", names(modules))


def _loftq(ledger: Ledger) -> None:
    peft = ledger.take("peft")
    if not isinstance(peft, dict):
        if peft is not None:
            ledger.drop("peft", peft, DEFAULT_REASON)
        return
    for key, value in peft.items():
        if key == "loftq_config" and isinstance(value, dict) and value.get("loftq_bits") == 4:
            if ledger.peft_key("peft.loftq_config", "init", "loftq") and not ledger.recipe["quantization"]:
                ledger.put("quantization.bits", 4)
                ledger.change("peft.loftq_config: loftq_bits 4 -> quantization.bits: 4 (LoftQ fits 4-bit)", "peft")
        else:
            ledger.drop(f"peft.{key}", value, DEFAULT_REASON)


def _quantization(ledger: Ledger, adapter: Any) -> None:
    four, eight = ledger.take("load_in_4bit"), ledger.take("load_in_8bit")
    if four is True or adapter == QLORA:
        ledger.carry("load_in_4bit" if four is True else "adapter", "quantization.bits", 4)
        if eight is True:
            ledger.drop("load_in_8bit", eight, "load_in_4bit is set too; the base is loaded in 4 bits")
    elif eight is True:
        ledger.carry("load_in_8bit", "quantization.bits", 8)
    kwargs = ledger.take("bnb_config_kwargs")
    for key, value in (kwargs or {}).items():
        if key == "bnb_4bit_quant_type" and ledger.get("quantization.bits") == 4:
            ledger.carry(f"bnb_config_kwargs.{key}", "quantization.quant_type", value)
        elif key == "bnb_4bit_use_double_quant" and ledger.get("quantization.bits") == 4:
            ledger.carry(f"bnb_config_kwargs.{key}", "quantization.double_quant", value)
        else:
            ledger.drop(f"bnb_config_kwargs.{key}", value, DEFAULT_REASON)


def _training(ledger: Ledger) -> None:
    if ledger.given("micro_batch_size"):
        ledger.carry("micro_batch_size", "training.batch_size", number(ledger.take("micro_batch_size")))
    else:
        ledger.take("micro_batch_size")
        ledger.fill("micro_batch_size", DEFAULT_MICRO_BATCH_SIZE, "training.batch_size")
    for key, target in (("num_epochs", "training.epochs"), ("max_steps", "training.max_steps")):
        if ledger.given(key):
            ledger.carry(key, target, number(ledger.take(key)))
        else:
            ledger.take(key)
    carry_trainer_keys(ledger)
    carry_scheduler(ledger, "lr_scheduler")
    carry_optimizer(ledger, "optimizer")
    carry_warmup_steps(ledger, "warmup_steps")
    checkpointing = ledger.take("gradient_checkpointing")
    if isinstance(checkpointing, bool):
        ledger.carry("gradient_checkpointing", "training.gradient_checkpointing", checkpointing)
    elif checkpointing is not None:
        ledger.drop("gradient_checkpointing", checkpointing, "training.gradient_checkpointing takes true/false/auto")
    if ledger.given("early_stopping_patience"):
        patience = number(ledger.take("early_stopping_patience"))
        ledger.carry("early_stopping_patience", "training.early_stopping_patience", patience)
    output = ledger.take("output_dir")
    if isinstance(output, str):
        ledger.carry("output_dir", "output.dir", ledger.for_recipe(ledger.origin.parent / output))
