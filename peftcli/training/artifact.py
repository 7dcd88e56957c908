"""Phase "keep artifact": the adapter (or full model) and the tokenizer with its chat template,
written atomically into the run directory. With early stopping it is the best adapter evaluated
(saved by the tracker when it was seen); otherwise the final one, evaluated once more."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftcli import console
from peftcli.errors import CheckFailed
from peftcli.model.device import is_main_process, is_out_of_memory, sharded_launch
from peftcli.recipe import Recipe
from peftcli.rundir import BEST_ADAPTER as BEST
from peftcli.rundir import BEST_INFO, TMP_PREFIX, artifact_dir, atomic_dir, replace_dir
from peftcli.rundir.report import write_card
from peftcli.training.checkpoints import refused_by_disk
from peftcli.training.setup import Setup


@dataclass(frozen=True)
class Kept:
    """Which adapter the run keeps, and its eval loss."""

    adapter_is: str  # best | final
    eval_loss: float | None


def save_artifact(recipe: Recipe, setup: Setup, model, folder: Path) -> None:
    """The method's artifact (adapter, or full model), the tokenizer with its chat template, and a
    model card from the recipe in place of PEFT's empty template (the report adds the figures)."""
    setup.method.save(recipe.peft, model, folder, setup.ctx)
    setup.tokenizer.save_pretrained(folder)
    write_card(folder, recipe)


def keep_artifact(recipe: Recipe, setup: Setup, trainer, best_eval_loss: float | None) -> Kept:
    """Put the run's artifact in place (rank 0 writes; every process takes part in collectives)."""
    out = recipe.run_dir
    main = is_main_process()
    final = artifact_dir(out, setup.method)
    if _use_best(out, recipe.training.early_stopping_patience is not None, main, trainer.args.world_size):
        if main:
            replace_dir(out / BEST, final)
            (out / BEST_INFO).unlink(missing_ok=True)  # metrics.json carries best_step / best_eval_loss
        return Kept("best", best_eval_loss)
    eval_loss = _final_eval(trainer, setup)
    save_final(recipe, setup, trainer, final, main)
    return Kept("final", eval_loss)


def _use_best(out: Path, early_stopping: bool, main: bool, world_size: int) -> bool:
    """Whether adapter/ is the best adapter kept during training. Rank 0 decides (it wrote that
    folder, and alone moves it); the others follow, since the final eval and save are collective."""
    use_best = early_stopping and main and (out / BEST).is_dir()
    if early_stopping and main and not use_best:
        console.warn(
            f"no {BEST}/ was kept (no eval ran, or the run started without early stopping): the final adapter is saved"
        )
    if world_size > 1:
        from peftcli.training.signals import any_process

        use_best = any_process(use_best)
    return use_best


def _final_eval(trainer, setup: Setup) -> float | None:
    """Eval loss of the final model (every process takes part). Training is done by now, so an OOM
    here costs only this figure."""
    if not setup.data.eval:
        return None
    logged = _eval_at_last_step(trainer.state)
    if logged is not None:
        return logged  # the trainer evaluated this very model already: one eval, logged once
    try:
        return trainer.evaluate()["eval_loss"]
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        if is_main_process():
            console.warn(
                "the final eval ran out of memory; eval_loss is not reported (peftcli eval "
                "--batch-size 1 computes it later)"
            )
        return None


def _eval_at_last_step(state) -> float | None:
    """The eval loss the trainer logged at the step training ended on, if any (it evaluates at the
    last step whenever `eval_steps` is set). Every process appends the same, gathered, entries to its
    log history, so all of them skip the collective eval together or none does."""
    last = next((entry for entry in reversed(state.log_history) if "eval_loss" in entry), None)
    if last is None or last.get("step") != state.global_step:
        return None
    return float(last["eval_loss"])


def save_final(recipe: Recipe, setup: Setup, trainer, final: Path, main: bool) -> None:
    if sharded_launch():
        # FSDP/ZeRO-3 shard the weights: every process takes part while the trainer gathers them.
        # A sharded state dict (the shipped FSDP configs) makes save_model write nothing: gather.
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        if plugin is not None:
            # set_state_dict_type keeps existing (sharded) configs; clear them so it builds full ones
            plugin.state_dict_config = plugin.optim_state_dict_config = None
            plugin.set_state_dict_type("FULL_STATE_DICT")
        staging = final.with_name(f"{TMP_PREFIX}{final.name}-gathered")
        trainer.save_model(str(staging))
        if main:
            if not any(staging.glob("*.safetensors")):
                raise CheckFailed(
                    f"the gathered {final.name} has no weights; the checkpoints are intact",
                    hint="convert the last checkpoint with accelerate's merge-weights tool",
                )
            setup.tokenizer.save_pretrained(staging)
            write_card(staging, recipe)
            replace_dir(staging, final)
    elif main:
        with refused_by_disk(final), atomic_dir(final) as tmp:  # a full disk: one line naming the folder
            save_artifact(recipe, setup, trainer.model, tmp)
