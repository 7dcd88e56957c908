"""What every PEFT method entry in the registry provides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from peftcli.errors import UserError
from peftcli.spec import Strict


class MethodSpec(Strict):
    """A method's own recipe keys. Subclasses add a `method: Literal[...]` tag and their keys."""

    tag_field: ClassVar[str] = "method"

    def check_with(self, recipe) -> None:
        """Checks that need other recipe sections (raise ValueError with a message naming the keys)."""


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


@dataclass(frozen=True)
class Method:
    """One registry row: how to apply the method, what it can do, and what it needs from training."""

    name: str
    spec: type[MethodSpec]
    # Wraps a loaded base model and returns the trainable model; imports peft lazily.
    apply: Callable[[Any, Any, MethodContext], Any]
    summary: str
    mergeable: bool
    quantized_base: bool
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

    def keys(self) -> dict[str, Any]:
        """The recipe keys this method takes, with their defaults (as `method: <name>` resolves them)."""
        defaults = self.spec.model_validate({self.spec.tag_field: self.name}).model_dump()
        defaults.pop(self.spec.tag_field)
        return defaults
