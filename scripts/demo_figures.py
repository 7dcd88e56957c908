#!/usr/bin/env python3
"""The demo's figures, read from the runs `make demo` wrote, and the README block that quotes them.

    python scripts/demo_figures.py                   print the figures (the end of `make demo`)
    python scripts/demo_figures.py --write README.md  put them into README's demo block
    python scripts/demo_figures.py --check README.md  exit 1 if README's figures are not what the runs show

README never quotes a demo figure by hand: the block between the two `demo-figures` markers is
written by `--write`, with the figures also kept as JSON in a comment, and tests/test_demo.py runs
the demo afresh and checks README's figures against it (to their order of magnitude: a rerun on
another machine moves the last digits, never the story).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- demo-figures:begin -->", "<!-- demo-figures:end -->"
# Figures a rerun reproduces exactly (parameter counts) and those it reproduces roughly.
EXACT = ("lora_trainable_params", "full_trainable_params", "skill_questions")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read {path} ({exc}); run `make demo` first") from exc


def figures(base_run: Path, demo_run: Path, compare_dir: Path) -> dict:
    """What the demo showed: the base's general ability, the skill LoRA taught, and LoRA against full
    fine-tuning on the same recipe (compare.json)."""
    base = _read(base_run / "metrics.json")
    evaluated = _read(demo_run / "eval.json")
    rows = {row["method"]: row for row in _read(compare_dir / "compare.json")["rows"]}
    missing = [m for m in ("lora", "full") if rows.get(m, {}).get("status") != "completed"]
    if missing:
        raise SystemExit(f"error: {compare_dir}/compare.json has no finished run for {', '.join(missing)}")
    lost = evaluated.get("forgetting") or {}
    figs = {
        "base_general_perplexity": lost.get("base_perplexity"),
        "base_pretrain_tokens": base.get("train_tokens"),
        "skill_loss_base": evaluated["base"]["loss"],
        "skill_loss_lora": evaluated["tuned"]["loss"],
        "skill_accuracy_base": evaluated["base"]["token_accuracy"],
        "skill_accuracy_lora": evaluated["tuned"]["token_accuracy"],
        # Whole answers generated greedily on the held-out questions: the skill as a user sees it.
        "skill_exact_base": evaluated["generation"]["base"]["exact_match"],
        "skill_exact_lora": evaluated["generation"]["tuned"]["exact_match"],
        "skill_questions": evaluated["generation"]["examples"],
        "lora_forgetting_percent": lost.get("forgetting_percent"),
    }
    for method in ("lora", "full"):
        row = rows[method]
        figs[f"{method}_trainable_params"] = row["trainable_params"]
        figs[f"{method}_trainable_percent"] = row["trainable_percent"]
        figs[f"{method}_checkpoint_mb"] = row["artifact_mb"]
        figs[f"{method}_eval_loss"] = row["eval_loss"]
        figs[f"{method}_compare_forgetting_percent"] = row.get("forgetting_percent")
    return figs


def render(figs: dict) -> str:
    """The README block: a table a newcomer compares with what `make demo` printed."""
    f = figs
    lines = [
        BEGIN,
        f"<!-- {json.dumps(f, sort_keys=True)} -->",
        "",
        f"The base, pre-trained on `recipes/data/general/corpus.txt` ({f['base_pretrain_tokens']:,} tokens), "
        f"predicts held-out general text at perplexity {f['base_general_perplexity']:.2f}. LoRA then trains "
        f"it on the skill: of {f['skill_questions']} held-out questions it answers "
        f"{round(f['skill_exact_base'] * f['skill_questions'])} exactly before and "
        f"{round(f['skill_exact_lora'] * f['skill_questions'])} after (eval loss {f['skill_loss_base']:.2f} → "
        f"{f['skill_loss_lora']:.2f}, next-token accuracy on the answers {f['skill_accuracy_base']:.0%} → "
        f"{f['skill_accuracy_lora']:.0%}), while its perplexity on general text moves "
        f"{f['lora_forgetting_percent']:+.1f} % (`runs/demo/eval.md`). "
        "The same recipe with full fine-tuning (`runs/demo-compare/compare.md`) learns the skill further and "
        "forgets far more:",
        "",
        "| | LoRA | full fine-tuning |",
        "|---|---|---|",
        f"| trainable parameters | {f['lora_trainable_params']:,} ({f['lora_trainable_percent']:.1f} %) "
        f"| {f['full_trainable_params']:,} ({f['full_trainable_percent']:.0f} %) |",
        f"| checkpoint on disk | {f['lora_checkpoint_mb']:.2f} MiB | {f['full_checkpoint_mb']:.2f} MiB |",
        f"| skill eval loss | {f['lora_eval_loss']:.3f} | {f['full_eval_loss']:.3f} |",
        f"| forgetting (general-text perplexity) | {f['lora_compare_forgetting_percent']:+,.1f} % "
        f"| {f['full_compare_forgetting_percent']:+,.0f} % |",
        "",
        END,
    ]
    return "\n".join(lines)


def quoted(readme: str) -> dict:
    """The figures README's block was written from."""
    block = re.search(re.escape(BEGIN) + r"\n<!-- (\{.*?\}) -->", readme)
    if not block:
        raise SystemExit(f"error: README has no {BEGIN} block; run scripts/demo_figures.py --write README.md")
    return json.loads(block.group(1))


def same_magnitude(quoted_value: float, fresh: float, small: float) -> bool:
    """Within a factor of three, or both below `small` (a forgetting of +0.4 % against +1.1 % tells
    the same story; their ratio means nothing)."""
    if abs(quoted_value) < small and abs(fresh) < small:
        return True
    if quoted_value == 0 or fresh == 0 or (quoted_value > 0) != (fresh > 0):
        return False
    return 1 / 3 <= fresh / quoted_value <= 3


def disagreements(readme_figs: dict, fresh: dict) -> list[str]:
    problems = [
        f"{k}: README says {readme_figs.get(k)}, the run gave {fresh[k]}"
        for k in EXACT
        if readme_figs.get(k) != fresh[k]
    ]
    for key, value in fresh.items():
        if key in EXACT:
            continue
        small = 5.0 if "forgetting" in key else 0.05
        if key not in readme_figs or value is None or not same_magnitude(readme_figs[key], value, small):
            problems.append(f"{key}: README says {readme_figs.get(key)}, the run gave {value}")
    return problems


def story_breaks(f: dict, threshold: float = 5.0) -> list[str]:
    """What README's sentences claim beyond the figures: a fresh run must still tell that story."""
    claims = [
        (f["skill_loss_lora"] < f["skill_loss_base"], "LoRA did not lower the skill's eval loss"),
        (
            f["skill_exact_lora"] >= 0.25 > f["skill_exact_base"],
            "LoRA does not answer a quarter of the held-out questions right, or the base already did",
        ),
        (f["lora_forgetting_percent"] < threshold, f"LoRA's forgetting is above the {threshold} % check"),
        (f["full_eval_loss"] < f["lora_eval_loss"], "full fine-tuning did not learn the skill further than LoRA"),
        (
            f["full_compare_forgetting_percent"] > 5 * max(f["lora_compare_forgetting_percent"], 1.0),
            "full fine-tuning did not forget far more than LoRA",
        ),
        (f["lora_checkpoint_mb"] * 5 < f["full_checkpoint_mb"], "LoRA's checkpoint is not far smaller"),
    ]
    return [claim for holds, claim in claims if not holds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="where make demo wrote its runs")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", type=Path, metavar="README", help="replace README's demo block")
    action.add_argument("--check", type=Path, metavar="README", help="exit 1 if README disagrees with the runs")
    args = parser.parse_args()
    fresh = figures(args.runs / "demo-base", args.runs / "demo", args.runs / "demo-compare")
    if args.write:
        text = args.write.read_text(encoding="utf-8")
        if BEGIN not in text or END not in text:
            raise SystemExit(f"error: {args.write} has no {BEGIN} ... {END} block to replace")
        head, rest = text.split(BEGIN, 1)
        args.write.write_text(head + render(fresh) + rest.split(END, 1)[1], encoding="utf-8")
        print(f"wrote the demo figures into {args.write}")
    elif args.check:
        problems = disagreements(quoted(args.check.read_text(encoding="utf-8")), fresh) + story_breaks(fresh)
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        if problems:
            raise SystemExit(1)
        print(f"{args.check}'s demo figures match the runs")
    else:
        print(render(fresh).split("\n", 2)[2].rsplit("\n", 1)[0].strip())


if __name__ == "__main__":
    main()
