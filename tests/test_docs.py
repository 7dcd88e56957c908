"""The docs stay true: the recipe reference is what the schema says, README is a front door whose
links resolve and whose recipe validates, and no module outgrows what a reader takes in at once."""

from __future__ import annotations

import re

from helpers import DEMO_TRAIN, ROOT

DOCS = ROOT / "docs"


def test_the_recipe_reference_is_generated_from_the_schema(cli):
    result = cli("schema", "--markdown")
    assert result.code == 0
    assert (DOCS / "recipe.md").read_text(encoding="utf-8") == result.out, (
        "docs/recipe.md is stale: run `peftcli schema --markdown --out docs/recipe.md`"
    )


def test_every_recipe_key_is_documented_in_the_reference():
    from peftcli.recipe.reference import SECTIONS

    reference = (DOCS / "recipe.md").read_text(encoding="utf-8")
    for section, model in SECTIONS.items():
        for key, field in model.model_fields.items():
            assert f"`{section}.{key}`" in reference
            assert field.description, f"{section}.{key} has no description in the schema"


def test_every_method_key_has_a_description():
    """docs/recipe.md and `peftcli init`'s comments show each method key's description: none is blank."""
    from peftcli.methods import REGISTRY

    missing = [
        f"{name}: peft.{key}"
        for name, method in REGISTRY.items()
        for key, field in method.spec.model_fields.items()
        if key != method.spec.tag_field and not field.description
    ]
    assert not missing, f"method keys without a description (methods/): {', '.join(missing)}"


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 12 * 1024
    for heading in ("## Two commands", "## One recipe", "## Commands", "## Read more"):
        assert heading in readme


def test_links_in_readme_and_docs_resolve():
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name}: link to {target} leads nowhere"


def test_readme_recipe_validates(tmp_path, cli):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    recipe = re.search(r"## One recipe\n\n```yaml\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "recipe.yaml").write_text(recipe, encoding="utf-8")
    (tmp_path / "data").mkdir()  # validate reads the data: the recipe's file must exist
    (tmp_path / "data" / "train.jsonl").write_text(DEMO_TRAIN.read_text(encoding="utf-8"), encoding="utf-8")
    result = cli("validate", tmp_path / "recipe.yaml")
    assert result.code == 0, result.err


def test_readme_lists_every_command(cli):
    from peftcli.cli import app

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    names = [c.name for c in app.registered_commands] + [g.name for g in app.registered_groups]
    for name in names:
        assert f"`peftcli {name}" in readme, f"README's command table lacks {name}"


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "peftcli").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert long == {}
