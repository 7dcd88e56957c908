"""What every PEFT method entry in the registry provides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Protocol

from pydantic import Field

from peftcli.errors import UserError
from peftcli.strict import Probability, Strict

# Keys several methods share, described once.
InputDropout = Annotated[
    Probability,
    Field(description="Dropout on a layer's input to the adapter's update (the base's path sees it unchanged)."),
]


class MethodSpec(Strict):
    """A method's own recipe keys. Subclasses add a `method: Literal[...]` tag and their keys."""

    tag_field: ClassVar[str] = "method"
    method: str  # each subclass narrows it to its names (a Literal), which pydantic dispatches on

    def check_with(self, recipe) -> None:
        """Checks that need other recipe sections (raise ValueError with a message naming the keys)."""


class DecoderShape(Protocol):
    """The shape of a dense decoder, from its config.json (model/size.py's Shape): what a method's
    trainable-parameter count is computed from, without loading any weight."""

    @property
    def hidden(self) -> int: ...

    @property
    def layers(self) -> int: ...

    @property
    def vocab(self) -> int: ...

    @property
    def kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    def linears(self) -> dict[str, tuple[int, int]]: ...  # (in, out) per linear of one block

    def linear_params(self) -> int: ...

    def other_params(self) -> int: ...


def chosen_linears(spec, shape: DecoderShape) -> dict[str, tuple[int, int]]:
    """The linears of one block that `spec.target_modules` adapts (all of them for all-linear)."""
    linears = shape.linears()
    targets = getattr(spec, "target_modules", "all-linear")
    return linears if targets == "all-linear" else {k: v for k, v in linears.items() if k in targets}


@dataclass
class MethodContext:
    """What a method may need beyond its own keys when it is applied to a model."""

    tokenizer_path: str
    total_steps: int
    scratch_dir: Path


def via_peft(
    config_class: str,
    rename: dict[str, str | None] | None = None,
    extra: Callable[[Any, Any, MethodContext], dict] | None = None,
    targets: str = "linear",
) -> Callable[[Any, Any, MethodContext], Any]:
    """An apply function that hands the spec's keys to a PEFT config class and wraps the model.

    `rename` maps our key names to PEFT's where they differ (None drops a key PEFT does not take);
    `extra` adds or replaces arguments computed from the model or the training context;
    `target_modules` is expanded and checked against the model (see targets.py).
    """
    from peftcli.methods.targets import resolve_targets

    rename = rename or {}

    def apply(spec, model, ctx: MethodContext):
        import peft

        values = spec.model_dump(exclude={spec.tag_field})
        if "target_modules" in values:
            values["target_modules"] = resolve_targets(spec.target_modules, model, targets)
        kwargs = {rename.get(k, k): v for k, v in values.items() if rename.get(k, k) is not None}
        if extra is not None:
            kwargs.update(extra(spec, model, ctx))
        config = getattr(peft, config_class)(task_type="CAUSAL_LM", **kwargs)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as exc:  # shapes the method cannot use, layers that do not exist, ...
            raise UserError(f"peft (method {spec.method}): {exc}") from None

    return apply


def save_pretrained(spec, model, out: Path, ctx: MethodContext) -> None:
    model.save_pretrained(out)


# The learning rate of LoRA and of most methods; a method that wants another states it in its row.
DEFAULT_LEARNING_RATE = 2e-4


@dataclass(frozen=True)
class Method:
    """One registry row: how to apply the method, what it can do, and what it needs from training."""

    name: str
    spec: type[MethodSpec]
    # Wraps a loaded base model and returns the trainable model; imports peft lazily.
    apply: Callable[[Any, Any, MethodContext], Any]
    summary: str
    mergeable: bool
    # Whether it trains on a 4-/8-bit base (the recipe's quantization section); when it cannot,
    # `why_no_quantized_base` says why (init's comment and the recipe error quote it).
    quantized_base: bool
    # Trainable parameters on a model of this shape, from its config alone: the fit estimate's
    # count (checked against peft on a real model for every method: tests/test_registry.py).
    count_trainable: Callable[[Any, DecoderShape], int]
    # Why it cannot be merged, and how to serve it instead (shown by `peftcli merge`).
    serve_hint: str = ""
    # Model types (config.model_type) it supports; None means any causal LM.
    model_types: frozenset[str] | None = None
    # Writes the final artifact (the adapter, or the full model for `full`/`freeze`).
    save: Callable[[Any, Any, Path, MethodContext], None] = save_pretrained
    # Trainer callbacks the method needs (AdaLoRA's rank re-allocation).
    callbacks: Callable[[Any], list] = field(default=lambda model: [])
    # TRL's fused LM-head loss reads `log_probs` from the model output; methods whose forward
    # does not go through the standard head (or that add their own loss terms) use the plain loss.
    fused_loss: bool = True
    # `full`/`freeze` train the base weights themselves: the run saves `model/`, not `adapter/`.
    saves_full_model: bool = False
    # Packing keeps examples apart through per-example position ids; methods that prepend virtual
    # tokens or key/value prefixes ignore or break them.
    packing: bool = True
    # The learning rate a recipe that leaves training.learning_rate unset trains with (and `init`
    # writes): prompt methods train few parameters far from the weights, a full fine-tune needs a
    # much smaller step.
    learning_rate: float = DEFAULT_LEARNING_RATE
    # Whether gradient checkpointing can recompute its layers (prefix tuning's cached key/value
    # prefix does not survive recomputation).
    checkpointing: bool = True
    # How PEFT's add_weighted_adapter combines its adapters: "low_rank" (every combination type) or
    # "scaling" (IA3's vectors: a weighted sum only); None: they cannot be combined. `uncombinable` says why a spec of a
    # combinable method cannot be (DoRA's magnitudes).
    combines_as: str | None = None
    uncombinable: Callable[[Any], str | None] = field(default=lambda spec: None)
    # Methods of one group can be attached to one base side by side (`peftcli generate` with
    # several adapters); None: only with adapters of the same method.
    attach_group: str | None = None
    # What `merge` folds the adapter into: the original full-precision weights, or the 4-bit
    # weights dequantized (LoftQ adapters correct exactly those).
    merges_into_dequantized: Callable[[Any], bool] = field(default=lambda spec: False)
    # Why vLLM's multi-LoRA server (`peftcli serve --engine vllm`) cannot load an adapter of this
    # spec, or None when it can: vLLM applies plain low-rank updates to the linear layers only.
    vllm_unservable: Callable[[Any], str | None] = field(default=lambda spec: "vLLM serves LoRA adapters only")
    # Why `peftcli export --adapter-only` cannot write an adapter of this spec as a llama.cpp LoRA
    # adapter, or None when it can: llama.cpp adds plain low-rank updates to linear layers only.
    gguf_adapter_unexportable: Callable[[Any], str | None] = field(
        default=lambda spec: "llama.cpp's adapters are plain LoRA updates"
    )

    # Why it cannot train on a quantized base, as a clause ("PEFT's LoHa has no 4-bit or 8-bit
    # (bitsandbytes) layer"); given exactly when quantized_base is False.
    why_no_quantized_base: str = ""

    def __post_init__(self) -> None:
        if self.quantized_base == bool(self.why_no_quantized_base):
            raise ValueError(
                f"method {self.name}: why_no_quantized_base says why the base cannot be quantized, so it is "
                "given when (and only when) quantized_base is False"
            )

    def trainable_percent(self, trainable: int, base_params: int) -> float:
        """`trainable` as a % of all parameters, as PEFT and the run report count them: an adapter's
        parameters come on top of the base's `base_params`; `full`/`freeze` train the base's own."""
        total = base_params if self.saves_full_model else base_params + trainable
        return 100 * trainable / max(total, 1)

    def keys(self) -> dict[str, Any]:
        """The recipe keys this method takes, with their defaults (as `method: <name>` resolves them)."""
        defaults = self.spec.model_validate({self.spec.tag_field: self.name}).model_dump()
        defaults.pop(self.spec.tag_field)
        return defaults
