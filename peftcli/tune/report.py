"""What a study leaves in `--out`, rebuilt from the study database after every trial (so an
interrupted study has them too): tune.json (every trial), tune.md (the table, best first),
tune.png (the losses each trial reported, the optimization history, the parameter importances) and
best-recipe.yaml (the recipe with the best trial's values, ready for `peftcli train`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from peftcli.recipe import Recipe, recipe_to_yaml
from peftcli.rundir import atomic_save_figure, atomic_write_json, atomic_write_text
from peftcli.rundir.eval_report import markdown_cell, markdown_text
from peftcli.tune.folder import BEST_RECIPE
from peftcli.tune.space import Dimension, with_params

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def trial_rows(study) -> list[dict]:
    """One row per trial, in trial order: its values, how it ended and where its run is."""
    rows = []
    stopped = set(study.user_attrs.get("interrupted") or [])
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        rows.append(
            {
                "trial": t.number,
                "state": "interrupted" if t.number in stopped else STATES.get(t.state.name, t.state.name.lower()),
                "params": dict(t.params),
                "value": t.value if t.value is not None and math.isfinite(t.value) else None,
                "reported": [[step, value] for step, value in sorted(t.intermediate_values.items())],
                "steps": attrs.get("steps"),
                "pruned_at": attrs.get("pruned_at"),
                "run_dir": attrs.get("run_dir"),
                "wall_s": attrs.get("wall_s"),
                "error": attrs.get("error"),
                "duplicate_of": attrs.get("duplicate_of"),
                "retry_of": attrs.get("retry_of"),
                "skipped": attrs.get("skipped") or [],
            }
        )
    return rows


def best_row(rows: list[dict]) -> dict | None:
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    return min(done, key=lambda r: (r["value"], r["trial"])) if done else None


def _ordered(rows: list[dict]) -> list[dict]:
    """Complete trials best first, then pruned, failed and the rest, each in trial order."""
    rank = {"complete": 0, "pruned": 1, "failed": 2, "interrupted": 3}
    return sorted(
        rows, key=lambda r: (rank.get(r["state"], 4), r["value"] if r["state"] == "complete" else 0, r["trial"])
    )


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "null" if value is None else str(value)


def markdown_table(rows: list[dict], keys: list[str], metric: str) -> str:
    head = ["trial", *keys, metric, "ended", "steps", "wall (s)", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = best_row(rows)
    for r in _ordered(rows):
        ended = r["state"]
        if r["state"] == "pruned":
            ended = f"pruned at step {r['pruned_at']}" if r["pruned_at"] is not None else "pruned"
        elif r["state"] in ("failed", "interrupted") and r["error"]:
            ended = f"{r['state']}: {r['error']}"
        elif r["duplicate_of"] is not None:
            ended = f"complete (same values as trial {r['duplicate_of']})"
        marker = " (best)" if best is not None and r["trial"] == best["trial"] else ""
        cells = [
            f"{r['trial']}{marker}",
            *(_shown(r["params"].get(k)) + (" (not used)" if k in r["skipped"] else "") for k in keys),
            "—" if r["value"] is None else f"{r['value']:.4f}",
            ended,
            "—" if r["steps"] is None else str(r["steps"]),
            "—" if r["wall_s"] is None else f"{r['wall_s']:.1f}",
            f"`{Path(r['run_dir']).name}/`" if r["run_dir"] else "—",
        ]
        lines.append("| " + " | ".join(markdown_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def importances(study) -> dict[str, float] | str:
    """Each searched key's share of the variation in the metric (Optuna's PED-ANOVA), or why there is none."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len({json.dumps(t.params, sort_keys=True) for t in complete}) < 2:
        return "needs two finished trials with different values"
    try:
        return dict(optuna.importance.get_param_importances(study))
    except Exception as exc:  # noqa: BLE001 - a side figure: the results are written without it
        return f"not computable yet ({exc.__class__.__name__}: {exc})"


def figure(rows: list[dict], found: dict[str, float] | str, metric: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (curves, history, bars) = plt.subplots(1, 3, figsize=(16, 4.2), dpi=100)
    best = best_row(rows)
    for r in rows:
        if not r["reported"] or r["duplicate_of"] is not None:
            continue
        steps, values = zip(*r["reported"])
        is_best = best is not None and r["trial"] == best["trial"]
        style = {"linestyle": "--", "color": "#999999", "linewidth": 1.0} if r["state"] == "pruned" else {}
        curves.plot(steps, values, marker=".", label=f"trial {r['trial']}" + (" (best)" if is_best else ""), **style)
    curves.set_title(f"{metric} while training (dashed: pruned)")
    curves.set_xlabel("optimizer step")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.grid(alpha=0.3)
    if any(r["reported"] for r in rows) and len(rows) <= 12:
        curves.legend(fontsize=7)

    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    pruned = [r for r in rows if r["state"] == "pruned" and r["value"] is not None]
    history.scatter([r["trial"] for r in done], [r["value"] for r in done], label="complete", zorder=3)
    if pruned:
        history.scatter(
            [r["trial"] for r in pruned],
            [r["value"] for r in pruned],
            marker="x",
            color="#999999",
            label="pruned (last report)",
        )
    if done:
        xs, best_so_far, lowest = [], [], math.inf
        for r in done:
            lowest = min(lowest, r["value"])
            xs.append(r["trial"])
            best_so_far.append(lowest)
        history.step(xs, best_so_far, where="post", color="#c44e52", label="best so far")
        history.legend(fontsize=7, loc="best")
    history.set_title("optimization history")
    history.set_xlabel("trial")
    history.xaxis.set_major_locator(MaxNLocator(integer=True))
    history.set_ylabel(metric)
    history.grid(alpha=0.3)

    bars.set_title("parameter importances")
    if isinstance(found, str):
        bars.text(0.5, 0.5, found, ha="center", va="center", wrap=True, fontsize=9, transform=bars.transAxes)
        bars.set_axis_off()
    else:
        keys = list(found)[::-1]
        drawn = bars.barh(keys, [found[k] for k in keys], color="#4c72b0")
        bars.bar_label(drawn, labels=[f"{found[k]:.2f}" for k in keys], padding=2, fontsize=8)
        bars.set_xlim(0, 1.15)
    fig.tight_layout()
    return fig


def best_recipe(recipe: Recipe, best: dict) -> Recipe:
    """The recipe with the best trial's values, writing its run where the recipe itself would."""
    return with_params(recipe, best["params"], out=recipe.run_dir)


def write_results(out: Path, study, recipe: Recipe, dims: list[Dimension], metric: str, wanted: int) -> dict | None:
    """Write tune.json, tune.md, tune.png and (once a trial completed) best-recipe.yaml; returns the best row."""
    rows = trial_rows(study)
    keys = [d.key for d in dims]
    best = best_row(rows)
    found = importances(study)
    summary = {
        "recipe": yaml.safe_load(recipe_to_yaml(recipe)),
        "space": {d.key: d.spec for d in dims},
        "metric": metric,
        "direction": "minimize",
        "trials_wanted": wanted,
        "best": best,
        "importances": found if isinstance(found, dict) else None,
        "rows": rows,
    }
    atomic_write_json(out / "tune.json", summary)
    atomic_save_figure(figure(rows, found, metric), out / "tune.png")
    if best is not None:
        values = ", ".join(f"{k}={_shown(v)}" for k, v in best["params"].items())
        header = (
            f"# The best of {len(rows)} trials of `peftcli tune` ({metric} {best['value']:.4f}, trial "
            f"{best['trial']}): {values}.\n# Train it with: peftcli train {out / BEST_RECIPE}\n"
        )
        atomic_write_text(out / BEST_RECIPE, header + recipe_to_yaml(best_recipe(recipe, best)))
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed", "interrupted")}
    if best is not None:
        verdict = f"Best: trial {best['trial']}, {metric} {best['value']:.4f}, with " + ", ".join(
            f"`{k}={_shown(v)}`" for k, v in best["params"].items()
        )
        verdict += f"; its recipe is `{BEST_RECIPE}` (`peftcli train {out / BEST_RECIPE}`)."
    else:
        verdict = "No trial has completed yet."
    text = "\n".join(
        [
            f"# Tuning `{recipe.model.name}` ({recipe.peft.method})",
            "",
            f"{len(rows)} of {wanted} trials: "
            + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
            + f". Metric: {metric}, lower is better. Searched: "
            + ", ".join(f"`{d.key}={d.spec}`" for d in dims)
            + ".",
            "",
            verdict,
            "",
            markdown_table(rows, keys, metric),
            "",
            "![tuning](tune.png)",
            "",
            f"Each trial's run directory (adapter, metrics, report) is `{out}/trial-NNN/`, its recipe "
            f"`{out}/trial-NNN.yaml`. The study is `{out}/study.db`: the same command continues it.",
            "",
        ]
    )
    atomic_write_text(out / "tune.md", markdown_text(text))
    return best
