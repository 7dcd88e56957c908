"""How `peftcli eval` reports: tables on the terminal, `eval.md` with the best and worst generated
examples side by side, `eval.png` (base vs tuned bars), and an eval section in the run's report.md."""

from __future__ import annotations

from pathlib import Path

from peftcli import report
from peftcli.rundir import EVAL, EVAL_MD, EVAL_PLOT, REPORT, atomic_save_figure, atomic_write_text
from peftcli.secrets import redact

LOSS_ROWS = (("loss", "lower"), ("perplexity", "lower"), ("token_accuracy", "higher"))
GEN_ROWS = (
    ("exact_match", "higher"),
    ("normalized_exact_match", "higher"),
    ("token_f1", "higher"),
    ("rouge_l", "higher"),
    ("length", None),
)
SHOWN = 5  # best and worst examples listed in eval.md


def _better(base: float, tuned: float, better: str | None) -> bool | None:
    if better is None or base == tuned:
        return None
    return tuned < base if better == "lower" else tuned > base


def _rows(base: dict, tuned: dict, rows) -> list[tuple[str, str, str, str, bool | None]]:
    return [
        (
            key,
            f"{base[key]:.4f}",
            f"{tuned[key]:.4f}",
            f"{tuned[key] - base[key]:+.4f}",
            _better(base[key], tuned[key], better),
        )
        for key, better in rows
    ]


def summary_lines(result: dict) -> list[str]:
    """Markdown: the eval figures (used by eval.md and report.md)."""
    lines = [
        f"Held-out data: {result['examples']} examples ({result['base']['tokens']:,} scored tokens).",
        "",
        "| metric | base | tuned | change |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {k} | {b} | {t} | {c} |" for k, b, t, c, _ in _rows(result["base"], result["tuned"], LOSS_ROWS)]
    forgetting = result.get("forgetting")
    if forgetting:
        flag = " **above the threshold**" if forgetting["flagged"] else ""
        lines += [
            "",
            f"Forgetting on `{Path(forgetting['reference']).name}` ({forgetting['examples']} passages): "
            f"perplexity {forgetting['base_perplexity']:.3f} -> {forgetting['tuned_perplexity']:.3f}, "
            f"**{forgetting['forgetting_percent']:+.2f} %** (threshold {forgetting['threshold_percent']:g} %)"
            f"{flag}.",
        ]
    generation = result.get("generation")
    if generation:
        mode = (
            "greedy"
            if generation["temperature"] == 0
            else f"temperature {generation['temperature']:g}, {generation['num_samples']} samples"
        )
        lines += [
            "",
            f"Generation on {generation['examples']} prompts ({mode}, up to "
            f"{generation['max_new_tokens']} new tokens):",
            "",
            "| metric | base | tuned | change |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {k} | {b} | {t} | {c} |" for k, b, t, c, _ in _rows(generation["base"], generation["tuned"], GEN_ROWS)
        ]
    return lines


def _cell(text) -> str:
    if isinstance(text, list):
        text = " / ".join(text)
    return redact(str(text)).replace("|", "\\|").replace("\n", " ")[:160]


def _examples_table(rows: list[dict]) -> list[str]:
    head = ["| prompt | reference | base | tuned | ROUGE-L base -> tuned |", "|---|---|---|---|---|"]
    return head + [
        f"| {_cell(r['prompt'])} | {_cell(r['reference'])} | {_cell(r['base'])} | {_cell(r['tuned'])} | "
        f"{r['scores']['base']['rouge_l']:.2f} -> {r['scores']['tuned']['rouge_l']:.2f} |"
        for r in rows
    ]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("eval loss", result["base"]["loss"], result["tuned"]["loss"]),
        ("token accuracy", result["base"]["token_accuracy"], result["tuned"]["token_accuracy"]),
    ]
    if result.get("generation"):
        gen = result["generation"]
        panels += [
            ("ROUGE-L", gen["base"]["rouge_l"], gen["tuned"]["rouge_l"]),
            ("exact match", gen["base"]["exact_match"], gen["tuned"]["exact_match"]),
        ]
    if result.get("forgetting"):
        f = result["forgetting"]
        panels.append(("reference ppl", f["base_perplexity"], f["tuned_perplexity"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3), dpi=100)
    for ax, (title, base, tuned) in zip(axes, panels):
        ax.bar(["base", "tuned"], [base, tuned], color=["#999999", "#4c72b0"])
        ax.set_title(title)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def write(run, recipe, result: dict, predictions: list[dict]) -> None:
    plot(result, run.path / EVAL_PLOT)
    lines = [f"# Eval of `{run.path.name}`: base vs tuned", "", *summary_lines(result), "", f"![eval]({EVAL_PLOT})"]
    if predictions:
        ranked = sorted(predictions, key=lambda r: r["scores"]["tuned"]["rouge_l"])
        lines += [
            "",
            f"## Best {min(SHOWN, len(ranked))} (tuned ROUGE-L)",
            "",
            *_examples_table(ranked[::-1][:SHOWN]),
            "",
            f"## Worst {min(SHOWN, len(ranked))}",
            "",
            *_examples_table(ranked[:SHOWN]),
            "",
            "Every example, with its scores: `predictions.jsonl`.",
        ]
    atomic_write_text(run.path / EVAL_MD, "\n".join(lines) + "\n")
    metrics = run.metrics()
    if metrics:  # refresh the run's report with the eval section
        has_plot = (run.path / report.LOSS_PLOT).exists()
        atomic_write_text(run.path / REPORT, redact(report.render_report(metrics, recipe, has_plot, result)))


def print_tables(result: dict, console) -> None:
    from rich.table import Table

    def table(title: str, base: dict, tuned: dict, rows) -> Table:
        view = Table(title=title)
        view.add_column("metric")
        for column in ("base", "tuned", "change"):
            view.add_column(column, justify="right")
        for key, b, t, change, better in _rows(base, tuned, rows):
            colour = {True: "green", False: "red", None: "white"}[better]
            view.add_row(key, b, t, f"[{colour}]{change}[/]")
        return view

    console.print(
        table(
            f"base vs tuned on {result['examples']} examples ({result['base']['tokens']:,} tokens)",
            result["base"],
            result["tuned"],
            LOSS_ROWS,
        )
    )
    if result.get("generation"):
        gen = result["generation"]
        console.print(table(f"generation on {gen['examples']} prompts", gen["base"], gen["tuned"], GEN_ROWS))
    if result.get("forgetting"):
        f = result["forgetting"]
        flag = "  [red]above the threshold[/]" if f["flagged"] else ""
        console.print(
            f"forgetting on {Path(f['reference']).name}: perplexity {f['base_perplexity']:.3f} -> "
            f"{f['tuned_perplexity']:.3f} ({f['forgetting_percent']:+.2f} %, threshold "
            f"{f['threshold_percent']:g} %){flag}"
        )
    console.print(
        f"written to {Path(result['run']) / EVAL} (and {EVAL_MD}, {EVAL_PLOT}"
        + (", predictions.jsonl)" if result.get("generation") else ")")
    )
