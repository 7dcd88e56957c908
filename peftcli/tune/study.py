"""`peftcli tune`: an Optuna study over recipe keys, each trial an ordinary run directory.

The study lives in `--out/study.db` (SQLite), so the same command continues it after an
interruption: trials that finished count, and a trial that was running when the study stopped
(Ctrl-C, a kill, a crash) is marked failed and tried again with the same values; it is never
counted as the best. The sampler is Optuna's TPE, seeded by training.seed and the number of trials
so far, so a continued study does not replay the first one's draws. Trials are pruned by Optuna's
median rule: once two trials have completed, a trial whose loss at an evaluation is worse than the
median of the others' at the same step stops there.

Before anything trains, every searched value is checked against the recipe (space.py) and the
metric against the data: a mistake there is one `error:` line and exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from peftcli import console
from peftcli.errors import EXIT_USER, Interrupted, ReportedError, UserError
from peftcli.interruption import Interruption
from peftcli.recipe import Recipe, recipe_to_yaml
from peftcli.rundir import atomic_write_text
from peftcli.rundir.guard import protected_paths
from peftcli.rundir.lock import RunLock
from peftcli.tune.folder import STUDY_DB, claim_trial, prepare, trial_name
from peftcli.tune.report import write_results
from peftcli.tune.space import Dimension, check_space, skipped_keys, with_params
from peftcli.tune.trial import METRICS, Outcome, run_trial

STUDY_NAME = "peftcli-tune"
STARTUP_TRIALS = 2  # completed trials before the pruner judges any other
EVALS_PER_TRIAL = 5  # when the recipe sets no training.eval_steps: about this many per trial
FAILURES_IN_A_ROW = 3  # the recipe itself is likely wrong: stop instead of failing every trial


class TuneFailed(ReportedError):
    """No trial completed, or trials kept failing: the reports are written, the exit code says why."""

    def __init__(self, message: str, hint: str, exit_code: int):
        super().__init__(message, hint)
        self.exit_code = exit_code


def check_metric(recipe: Recipe, metric: str) -> None:
    if metric not in METRICS:
        raise UserError(f"--metric {metric}: not a metric tune reads", hint=f"metrics: {', '.join(METRICS)}")
    if metric == "eval_loss" and recipe.data.eval is None and recipe.data.eval_split is None:
        raise UserError(
            "--metric eval_loss needs eval data: the recipe sets neither data.eval nor data.eval_split",
            hint="add data.eval_split: 0.1 (or data.eval), or tune on --metric train_loss",
        )


def eval_every(recipe: Recipe, metric: str) -> int | None:
    """training.eval_steps for the trials, so the pruner has eval losses to judge: the recipe's own,
    or about EVALS_PER_TRIAL per trial."""
    if metric != "eval_loss" or recipe.training.eval_steps is not None:
        return None
    return max(1, trial_steps(recipe) // EVALS_PER_TRIAL)


def trial_steps(recipe: Recipe) -> int:
    """The steps a trial of `recipe` trains, counted as training counts them (training.setup) from
    the rows it trains on: data.eval_split held out and the sources mixed. A hub source's rows are
    read only when training, so they are not counted here; with batch_size: auto, a step is the
    effective batch it keeps."""
    from peftcli.data.pipeline import read_examples, split_train
    from peftcli.training.setup import planned_steps

    t, data = recipe.training, recipe.data
    rows = 0
    if not t.max_steps:
        local = [s for s in data.train if Path(s.path).is_absolute()]
        read = read_examples(local, data, "data.train").per_source if local else []
        if local and len(local) == len(data.train):
            rows = len(split_train(read, data, t.seed)[0])
        else:
            rows = sum(len(examples) for examples in read)
    per_step = t.batch_size * t.gradient_accumulation if isinstance(t.batch_size, int) else t.target_batch
    return planned_steps(t, rows, per_step)


def _signature(recipe: Recipe, dims: list[Dimension], metric: str) -> dict:
    """What makes a study the same study: the recipe (its output.dir aside), the space and the metric."""
    data = recipe.model_dump(mode="json")
    data.get("output", {}).pop("dir", None)
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    return {"recipe": digest, "space": {d.key: d.spec for d in dims}, "metric": metric}


def open_study(out: Path, signature: dict, seed: int, prune: bool):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{out / STUDY_DB}"
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="minimize", load_if_exists=True)
    saved = study.user_attrs.get("signature")
    if saved is None:
        study.set_user_attr("signature", signature)
    elif saved != signature:
        changed = [k for k in signature if saved.get(k) != signature[k]]
        raise UserError(
            f"--out {out} holds a study of another {' and '.join(changed)}: "
            + "; ".join(f"{k} was {saved.get(k)}" for k in changed if k != "recipe"),
            hint="continue it with its own recipe and --space, or add --overwrite to start a new study there",
        )
    study.sampler = optuna.samplers.TPESampler(seed=(seed + len(study.trials)) % 2**32)
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS) if prune else optuna.pruners.NopPruner()
    return study


def recover(study) -> list[int]:
    """Trials left running by a study that was killed: marked failed (interrupted) and queued again,
    once each, with the same values. Returns their numbers."""
    import optuna

    State = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
        mark_interrupted(study, t.number)
        study.tell(t.number, state=State.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    again = [t for t in trials if t.number in interrupted(study) and t.number not in retried]
    for t in again:
        study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
    return [t.number for t in again]


def counted(study) -> int:
    """Trials that count towards --trials: every finished one but those interrupted (tried again)."""
    import optuna

    State = optuna.trial.TrialState
    stopped = interrupted(study)
    return sum(
        t.state in (State.COMPLETE, State.PRUNED) or (t.state == State.FAIL and t.number not in stopped)
        for t in study.get_trials(deepcopy=False)
    )


def interrupted(study) -> set[int]:
    """Trials that were running when the study stopped (kept in the study: a finished trial's
    attributes cannot change, and a killed study never finished its trial)."""
    return set(study.user_attrs.get("interrupted") or [])


def mark_interrupted(study, number: int) -> None:
    study.set_user_attr("interrupted", sorted(interrupted(study) | {number}))


def _same_values(study, params: dict):
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.params == params and t.value is not None:
            return t
    return None


def run_tune(
    recipe: Recipe,
    dims: list[Dimension],
    trials: int,
    out: Path,
    metric: str = "eval_loss",
    timeout_s: float | None = None,
    overwrite: bool = False,
    prune: bool = True,
    recipe_file: Path | None = None,
    command: str = "peftcli tune",
) -> dict | None:
    """Run (or continue) the study until `trials` trials have finished or `timeout_s` has passed;
    returns the best trial's row (None if none completed, which raises TuneFailed)."""
    check_metric(recipe, metric)
    check_space(recipe, dims)  # every refusal before anything is written or trained
    every = eval_every(recipe, metric)
    out = out.resolve()
    continuing = prepare(out, overwrite, protected_paths(recipe, recipe_file))
    with RunLock(out):  # one study at a time in this folder
        study = open_study(out, _signature(recipe, dims, metric), recipe.training.seed, prune)
        retried = recover(study)
        if continuing:
            done = counted(study)
            again = f"; trying again the interrupted trial(s) {', '.join(map(str, retried))}" if retried else ""
            console.note(f"continuing the study in {out}: {done} of {trials} trials done{again}")
        try:
            failures = _loop(study, recipe, dims, trials, out, metric, timeout_s, every, command)
        finally:
            best = write_results(out, study, recipe, dims, metric, trials)
    _verdict(out, best, failures, metric)
    return best


def _loop(study, recipe, dims, trials, out, metric, timeout_s, every, command) -> list[Outcome]:
    """Trials until enough have finished; returns the failures of the last ones in a row."""
    started, in_a_row = time.monotonic(), list[Outcome]()
    while counted(study) < trials:
        if timeout_s is not None and time.monotonic() - started >= timeout_s:
            console.note(f"--timeout: {timeout_s:g} s passed, no new trial started (the same command continues)")
            break
        outcome = _one_trial(study, recipe, dims, trials, out, metric, every, command)
        in_a_row = in_a_row + [outcome] if outcome.state == "failed" else []
        if len(in_a_row) >= FAILURES_IN_A_ROW:
            break
    return in_a_row


def _one_trial(study, recipe, dims, trials, out, metric, every, command) -> Outcome:
    trial = study.ask()
    try:
        params = {d.key: d.suggest(trial) for d in dims}
        name = trial_name(trial.number)
        label = f"[trial {trial.number}, {counted(study) + 1} of {trials}]"
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        if skipped_keys(params):
            trial.set_user_attr("skipped", skipped_keys(params))
        same = _same_values(study, params)
        if same is not None:  # TPE proposes a point again: its result is known
            for key, value in {"duplicate_of": same.number, "run_dir": same.user_attrs.get("run_dir")}.items():
                trial.set_user_attr(key, value)
            study.tell(trial, same.value)
            console.err.print(
                f"{label} {shown}: same values as trial {same.number}, {metric} {same.value:.4f}", markup=False
            )
            return Outcome("complete", same.value)
        extra = {"training.eval_steps": every} if every else {}
        try:
            trial_recipe = with_params(recipe, params, out / name, extra)
        except UserError as exc:  # values that are fine alone but not together
            outcome = Outcome("failed", error=exc.message, exit_code=exc.exit_code)
        else:
            claim_trial(out, name)
            atomic_write_text(out / f"{name}.yaml", recipe_to_yaml(trial_recipe))
            trial.set_user_attr("run_dir", str(out / name))
            console.err.print(f"{label} training with {shown}", markup=False)
            outcome = run_trial(trial_recipe, out / f"{name}.yaml", trial, metric)
        _tell(study, trial, outcome)
        console.err.print(f"{label} {_said(outcome, metric)} ({outcome.wall_s:.1f} s)", markup=False)
        return outcome
    except (Interrupted, Interruption) as exc:
        if study.get_trials(deepcopy=False)[trial.number].state == _state("RUNNING"):
            mark_interrupted(study, trial.number)
            study.tell(trial, state=_state("FAIL"))
        if isinstance(exc, Interrupted):  # stopped inside the training loop, which saved a checkpoint
            raise Interrupted(
                exc.exit_code - 128,
                f"stopped during trial {trial.number} ({exc.message}); the study is saved in {out / STUDY_DB}",
                hint=f"continue the study with: {command} (the interrupted trial runs again)",
            ) from None
        raise


def _state(name: str):
    import optuna

    return optuna.trial.TrialState[name]


def _tell(study, trial, outcome: Outcome) -> None:
    for key, value in {
        "steps": outcome.steps,
        "pruned_at": outcome.pruned_at,
        "wall_s": round(outcome.wall_s, 2),
        "error": outcome.error,
        "exit_code": outcome.exit_code,
    }.items():
        if value is not None:
            trial.set_user_attr(key, value)
    if outcome.state == "complete":
        study.tell(trial, outcome.value)
    else:
        study.tell(trial, state=_state("PRUNED" if outcome.state == "pruned" else "FAIL"))


def _said(outcome: Outcome, metric: str) -> str:
    if outcome.state == "complete":
        return f"{metric} {outcome.value:.4f}"
    if outcome.state == "pruned":
        last = f", {metric} {outcome.reported[-1][1]:.4f}" if outcome.reported else ""
        return f"pruned at step {outcome.pruned_at}{last}"
    return f"failed: {outcome.error}"


def _verdict(out: Path, best: dict | None, failures: list[Outcome], metric: str) -> None:
    from peftcli.tune.folder import BEST_RECIPE

    if len(failures) >= FAILURES_IN_A_ROW:
        user = all(f.exit_code == EXIT_USER for f in failures)
        raise TuneFailed(
            f"{len(failures)} trials in a row failed, the last with: {failures[-1].error}",
            hint=f"each trial's error is in {out / 'tune.md'}; rerun one with `peftcli train {out}/trial-NNN.yaml "
            "--overwrite` to see its full output",
            exit_code=EXIT_USER if user else 1,
        )
    if best is None:
        raise TuneFailed(
            "no trial completed",
            hint=f"see {out / 'tune.md'}; the same command continues the study",
            exit_code=EXIT_USER,
        )
    values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    console.out.print(
        f"best: trial {best['trial']}, {metric} {best['value']:.4f}, with {values}\n"
        f"written to {out / 'tune.md'} (+ tune.json, tune.png) and {out / BEST_RECIPE} "
        f"(train it with: peftcli train {out / BEST_RECIPE})",
        markup=False,
    )
