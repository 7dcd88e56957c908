"""The recipe: one pydantic model per section of the public recipe contract.

Section and key names are the public interface (docs/recipe.md, generated from this file by
reference.py); add keys freely,
rename none. Every section forbids unknown keys so a typo is an error, not a silently ignored
setting. Checks that need two keys at once live in `_cross_checks` so they run before any model
loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from peftcli.methods import DEFAULT_LEARNING_RATE, DEFAULT_METHOD, REGISTRY, MethodSpec, PeftSpec, method_of

if TYPE_CHECKING:  # the union is built from the registry at run time; to a type checker it is a MethodSpec
    PeftField = MethodSpec
else:
    PeftField = PeftSpec
from peftcli.strict import (
    Name,
    NoBool,
    NonNegativeFloat,
    OpenFraction,
    PositiveFloat,
    PositiveInt,
    Probability,
    Strict,
    refuse_bool,
)

DType = Literal["auto", "bfloat16", "float16", "float32"]
BUILTIN_TEMPLATES = ("chatml", "llama3", "mistral")  # data.chat_template names; anything else is a file
Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]
# What a role name of a data file may stand for: tool = a tool's output (never trained), tool_call =
# an assistant turn that calls a function (trained).
Role = Literal["system", "user", "assistant", "tool", "tool_call"]


class ModelSection(Strict):
    name: Name = Field(description="Local directory or hub id of the base causal LM.")
    dtype: DType = Field("auto", description="auto = bfloat16 on a CUDA GPU that supports it, else float32.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint.")
    revision: Name | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: Name | None = Field(None, description="Tokenizer path or id when it differs from `name`.")
    attn_implementation: Literal[
        "auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "peftcli_varlen"
    ] = Field(
        "auto",
        description="Attention kernel. auto = the fastest exact one here (packed: flash-attn varlen, else torch's "
        "varlen_attn as peftcli_varlen, else sdpa with a mask per row); peftcli validate shows it.",
    )


class QuantizationSection(Strict):
    bits: Literal[4, 8] = Field(description="Load the base in 4 or 8 bits with bitsandbytes.")
    quant_type: Literal["nf4", "fp4"] | None = Field(None, description="4-bit data type (default nf4).")
    double_quant: bool | None = Field(None, description="Quantise the 4-bit scales too (default true).")
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] | None = Field(
        None, description="How 4-bit weights are stored (default uint8); FSDP needs the compute dtype, e.g. bfloat16."
    )

    @model_validator(mode="after")
    def _four_bit_keys(self) -> QuantizationSection:
        if self.bits == 8:
            for key in ("quant_type", "double_quant", "storage_dtype"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} applies to 4-bit only; remove it or set bits: 4")
        return self

    # Unset keys stay None in the recipe (so a saved recipe can switch to 8 bits with --set); these
    # are the values they stand for.
    @property
    def effective_quant_type(self) -> str:
        return self.quant_type or "nf4"

    @property
    def effective_double_quant(self) -> bool:
        return True if self.double_quant is None else self.double_quant

    def describe(self) -> str:
        return f"{self.bits}-bit" + (f" {self.effective_quant_type}" if self.bits == 4 else "")


class DataSource(Strict):
    path: Name = Field(description="Local file, directory or glob (.jsonl/.json/.csv/.parquet), or a hub id.")
    format: Format | None = Field(None, description="Overrides data.format for this source.")
    weight: PositiveFloat | None = Field(None, description="Mixing weight relative to the other sources.")
    split: Name = Field("train", description="Split of a hub dataset.")
    subset: Name | None = Field(None, description="Subset (config name) of a hub dataset.")
    revision: Name | None = Field(None, description="Revision of a hub dataset.")
    columns: dict[str, str] | None = Field(None, description="Overrides data.columns for this source.")
    roles: dict[str, Role] | None = Field(None, description="Overrides data.roles for this source.")


def _as_source_list(value: Any) -> Any:
    """Accept `train: file.jsonl`, `train: {path: ...}` or a list of either; store a list of sources."""
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if any(isinstance(item, str) and not item.strip() for item in items):
        raise ValueError("must not be empty; give a file, folder, glob or hub id")  # named as data.train, not [0].path
    return [{"path": item} if isinstance(item, str) else item for item in items]


# Stored as a list of sources; written as a path, a source mapping, or a list of either.
Sources = Annotated[
    list[DataSource],
    Field(min_length=1),
    BeforeValidator(_as_source_list, json_schema_input_type=str | DataSource | list[str | DataSource]),
]


class DataSection(Strict):
    train: Sources = Field(
        description="Training data: a .jsonl/.json/.csv/.parquet/.txt file, a folder or glob of them, a hub id, "
        "or a list of sources.",
    )
    eval: Sources | None = Field(None, description="Held-out data; or use eval_split.")
    eval_split: OpenFraction | None = Field(None, description="Fraction of train held out for eval (or set data.eval).")
    format: Format = Field("auto", description="Row format; auto detects it from the columns.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map format fields onto your column names, e.g. {output: answer}; for messages/sharegpt also "
        "the keys inside each turn, e.g. {from: role, value: content}.",
    )
    roles: dict[str, Role] = Field(
        default_factory=dict,
        description="Role names of your files beyond the usual ones, e.g. {human: user, observation: tool, "
        "function_call: tool_call}.",
    )
    text_split: Literal["auto", "paragraph", "line"] = Field(
        "auto",
        description=".txt files: one example per paragraph (blank-line separated) or per line; auto = paragraphs "
        "when most lines lie in blank-line separated blocks of a few lines, else lines (a note says which).",
    )
    chat_template: Name = Field("auto", description="auto | chatml | llama3 | mistral | path to a .jinja file.")
    train_on: Literal["completions", "all", "last_turn"] = Field("completions", description="Which tokens carry loss.")
    max_length: PositiveInt = Field(1024, description="Tokens per example (or per packed row).")
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="Pack examples into padding-free rows (no cross-attention). auto = on a CUDA GPU for methods "
        "that allow it; off on CPU.",
    )
    overlong: Literal["truncate", "drop", "error", "split"] = Field(
        "truncate", description="Examples longer than max_length; split cuts plain text into max_length blocks."
    )
    bad_rows: Literal["error", "skip"] = Field("error", description="Malformed rows: stop, or skip and count.")


DEFAULT_EPOCHS = 1.0
# batch_size: auto keeps this many examples per optimizer step unless effective_batch_size says otherwise,
# in micro-batches of CPU_MICRO_BATCH on a CPU (where memory is not what limits the batch).
DEFAULT_EFFECTIVE_BATCH = 16
CPU_MICRO_BATCH = 4


class TrainingSection(Strict):
    max_steps: PositiveInt | None = Field(None, description="Optimizer steps; or set epochs.")
    epochs: PositiveFloat | None = Field(
        None, description=f"Passes over the data ({DEFAULT_EPOCHS:g} when neither is set)."
    )
    batch_size: PositiveInt | Literal["auto"] = Field(
        4,
        description="Examples per device per micro-batch. auto = the largest that fits the free GPU memory by the "
        "fit estimate (+15 % + 1 GiB), confirmed by a trial step that backs off if it runs out of memory; "
        f"{CPU_MICRO_BATCH} on CPU. gradient_accumulation is then chosen to keep effective_batch_size.",
    )
    gradient_accumulation: PositiveInt = Field(
        1, description="Micro-batches per optimizer step (chosen by batch_size: auto; leave it at 1 then)."
    )
    effective_batch_size: PositiveInt | None = Field(
        None,
        description="Examples per optimizer step over all devices, which batch_size: auto keeps by choosing "
        f"gradient_accumulation ({DEFAULT_EFFECTIVE_BATCH} when unset). With a numeric batch_size it is only "
        "checked: a multiple of batch_size x gradient_accumulation (the factor is the number of devices).",
    )
    # Unset, the method's own (Recipe fills it in); the default here is the one most methods share.
    learning_rate: PositiveFloat = Field(
        DEFAULT_LEARNING_RATE,
        description=f"Peak learning rate. Unset: the rate that suits peft.method ({DEFAULT_LEARNING_RATE:g} for most; "
        "`peftcli init --method NAME` writes it), which `peftcli validate` and the run's saved recipe show.",
    )
    lr_scheduler: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"
    ] = Field("linear", description="Learning-rate schedule after the warm-up.")
    warmup_ratio: Probability = Field(0.0, description="Fraction of steps spent warming up.")
    weight_decay: NonNegativeFloat = Field(0.0, description="AdamW weight decay.")
    max_grad_norm: NonNegativeFloat = Field(1.0, description="Gradient clipping; 0 disables.")
    optimizer: Literal["auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"] = Field(
        "auto", description="auto = fused AdamW (on CPU and GPU)."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Trade compute (~35 % on a 1B model) for activation memory (non-reentrant). auto = on a GPU "
        "only when the fit estimate without it does not fit the free GPU memory (+15 % + 1 GiB); off on CPU and "
        "for prefix tuning.",
    )
    liger: bool | Literal["auto"] = Field(
        "auto",
        description="Liger fused kernels (RMSNorm, SwiGLU, RoPE). auto = on a GPU when liger-kernel is installed.",
    )
    tf32: bool | Literal["auto"] = Field("auto", description="TF32 matmuls for fp32 work. auto = on Ampere+ GPUs.")
    compile: bool = Field(False, description="torch.compile the model (slower start, faster steps on GPU).")
    seed: Annotated[int, Field(ge=0, lt=2**32), NoBool] = Field(
        42, description="Seeds model init, data order, dropout and the eval split."
    )
    eval_steps: PositiveInt | None = Field(None, description="Compute the eval loss every N steps while training.")
    early_stopping_patience: PositiveInt | None = Field(
        None, description="Stop after N evals without improvement; adapter/ is then the best one seen."
    )
    early_stopping_threshold: NonNegativeFloat = Field(
        0.0, description="Smallest eval-loss drop that counts as an improvement."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],  # type: ignore[arg-type,return-value]
        description="Loggers: tensorboard (into RUN/tensorboard), wandb, mlflow (when installed); [] for none.",
    )
    logging_steps: PositiveInt = Field(1, description="Log the loss every N steps.")
    save_steps: PositiveInt = Field(100, description="Write checkpoint-N every N steps (and at the end).")
    save_total_limit: PositiveInt | None = Field(3, description="Keep at most this many checkpoints.")

    @property
    def effective_epochs(self) -> float:
        """The epochs a run without max_steps trains for: this is the one home of that default."""
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS

    def describe_length(self) -> str:
        return f"{self.max_steps} steps" if self.max_steps else f"{self.effective_epochs:g} epochs"

    @field_validator("batch_size", mode="before")
    @classmethod
    def _number_or_auto(cls, value: Any) -> Any:
        # One message instead of one per branch of the union ("not an integer", "not 'auto'").
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            return value
        if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
            return int(value)
        if isinstance(value, float) and value.is_integer() and value > 0:
            return int(value)
        refuse_bool(value)  # true/false is refused as for every number key, in the same words
        raise ValueError("expects a whole number above 0, or auto")

    @property
    def target_batch(self) -> int:
        """Examples per optimizer step that batch_size: auto keeps (over all devices)."""
        return self.effective_batch_size or DEFAULT_EFFECTIVE_BATCH

    @model_validator(mode="after")
    def _batch_keys_agree(self) -> TrainingSection:
        if self.batch_size == "auto" and self.gradient_accumulation != 1:
            raise ValueError(
                "gradient_accumulation is chosen by batch_size: auto (to keep effective_batch_size); remove it, "
                "or give batch_size a number"
            )
        if isinstance(self.batch_size, int) and self.effective_batch_size is not None:
            per_step = self.batch_size * self.gradient_accumulation
            if self.effective_batch_size % per_step:
                raise ValueError(
                    f"effective_batch_size {self.effective_batch_size} is not a multiple of batch_size x "
                    f"gradient_accumulation ({self.batch_size} x {self.gradient_accumulation}); set batch_size: "
                    "auto to have gradient_accumulation chosen, or drop effective_batch_size"
                )
        return self


class EvalSection(Strict):
    reference: Name | None = Field(
        None, description="General text (a .txt file or any data format) to measure forgetting on."
    )
    forgetting_threshold: NonNegativeFloat = Field(
        5.0, description="Perplexity rise on the reference, in %, that the report flags."
    )
    benchmark_threshold: NonNegativeFloat = Field(
        5.0,
        description="Benchmarks (eval --tasks): a task's figure worse by more than this, in % of the base's, "
        "is flagged (unless within twice the change's standard error).",
    )
    max_new_tokens: PositiveInt = Field(64, description="Generation eval: tokens generated per prompt.")
    temperature: NonNegativeFloat = Field(0.0, description="Generation eval: 0 = greedy.")
    num_samples: PositiveInt = Field(1, description="Generation eval: samples per prompt (needs temperature > 0).")

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> EvalSection:
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError("eval.num_samples > 1 needs eval.temperature > 0 (greedy samples are identical)")
        return self


class OutputSection(Strict):
    dir: Name | None = Field(None, description="Run directory (default runs/<recipe name>).")


class Recipe(Strict):
    model: ModelSection
    quantization: QuantizationSection | None = None
    peft: PeftField = Field(
        default_factory=lambda: REGISTRY[DEFAULT_METHOD].spec.model_validate({"method": DEFAULT_METHOD})
    )
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @field_validator("peft", mode="before")
    @classmethod
    def _default_method(cls, value: Any) -> Any:
        # `method` picks the spec that validates the other keys; a peft section without it is the default.
        if isinstance(value, dict) and "method" not in value:
            return {"method": DEFAULT_METHOD, **value}
        return value

    @model_validator(mode="after")
    def _method_learning_rate(self) -> Recipe:
        # An unset learning rate is the one that suits the method (the registry's), not one for all.
        if "learning_rate" not in self.training.model_fields_set:
            self.training = _with_method_learning_rate(self.training, method_of(self.peft).learning_rate)
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        data, training = self.data, self.training
        if data.eval is not None and data.eval_split is not None:
            raise ValueError("data.eval and data.eval_split both set; keep one")
        if training.max_steps is not None and training.epochs is not None:
            raise ValueError("training.max_steps and training.epochs both set; keep one")
        has_eval = data.eval is not None or data.eval_split is not None
        if training.eval_steps is not None and not has_eval:
            raise ValueError("training.eval_steps needs eval data: set data.eval or data.eval_split")
        if training.early_stopping_patience is not None and training.eval_steps is None:
            raise ValueError("training.early_stopping_patience needs training.eval_steps (how often to evaluate)")
        method = method_of(self.peft)
        if self.quantization is not None and not method.quantized_base:
            raise ValueError(
                f"peft.method '{self.peft.method}' cannot train on a quantized base ({method.why_no_quantized_base}); "
                "remove the quantization section"
            )
        chats = {s.format or data.format for s in [*data.train, *(data.eval or [])]} - {"auto", "text"}
        if data.overlong == "split" and chats:  # one detected from its columns is refused when read
            raise ValueError(
                f"data.overlong: split cuts plain text into max_length blocks, and a source is format {min(chats)}: "
                "a reply cut in two is not a reply; use truncate, drop or error, or a recipe of the text alone"
            )
        if self.data.packing is True and not method.packing:
            raise ValueError(
                f"data.packing: peft.method '{self.peft.method}' adds virtual tokens that break the per-example "
                "position ids packing relies on; set data.packing: false"
            )
        self.peft.check_with(self)
        return self

    @property
    def run_dir(self) -> Path:
        """`output.dir`, which loading a recipe always fills (runs/<recipe name> by default)."""
        if self.output.dir is None:
            raise ValueError("output.dir is unset: recipes are loaded through peftcli.recipe.load_recipe")
        return Path(self.output.dir)

    @property
    def is_quantized(self) -> bool:
        return self.quantization is not None


def _with_method_learning_rate(training: TrainingSection, rate: float) -> TrainingSection:
    """`training` with the method's learning rate, still counted as unset (not in model_fields_set):
    the recipe's saved copy shows the rate used, and a copy run with another method (`compare`) knows
    to take that method's rate instead."""
    values = {**dict(training), "learning_rate": rate}
    return TrainingSection.model_construct(_fields_set=set(training.model_fields_set), **values)


def recipe_data(recipe: Recipe, method: str) -> dict:
    """`recipe` as plain data (JSON types) for running it with peft.method `method`: the same keys,
    its peft section if it uses that method (else `{method: ...}`, the defaults), and no learning
    rate when the recipe left it to the method."""
    data = recipe.model_dump(mode="json")
    if recipe.peft.method != method:
        data["peft"] = {"method": method}
        if "learning_rate" not in recipe.training.model_fields_set:
            data["training"].pop("learning_rate")
    return data


def rebuild() -> None:
    """Let recipes name every method in the registry now (after `peftcli.methods.register`)."""
    from pydantic.fields import FieldInfo

    from peftcli.methods import spec_union

    current = Recipe.model_fields["peft"]
    # spec_union() is an Annotated union, which from_annotation takes (its stub says a type)
    Recipe.model_fields["peft"] = FieldInfo.merge_field_infos(
        FieldInfo.from_annotation(spec_union()),  # type: ignore[arg-type]
        default_factory=current.default_factory,
    )
    Recipe.model_rebuild(force=True)
