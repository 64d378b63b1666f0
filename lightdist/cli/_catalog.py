"""``lightdist recipes``: the recipes and configs on disk, and ``--config`` name lookup.

Nothing is registered by hand: a recipe is a module of the ``lightdist.recipes`` package whose
docstring opens with a ``lightdist ...`` command, and a config is a YAML file under that package's
``configs/`` directory (installed with it; ``configs/`` at the top of a source checkout links there)
whose opening comments give its command and a one-line description. Both are read as text (``ast``
and YAML), so listing them imports neither torch nor the recipes.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ConfigInfo",
    "RecipeInfo",
    "configs_root",
    "find_configs",
    "find_recipes",
    "main",
    "resolve_config_args",
    "shipped_config",
]


@dataclass(frozen=True)
class RecipeInfo:
    name: str  # module name inside lightdist.recipes
    path: Path
    command: str  # the docstring's first line
    description: str


@dataclass(frozen=True)
class ConfigInfo:
    name: str  # path under configs/ without ".yaml", e.g. "digits/pretrain-cpu"
    path: Path
    command: str
    description: str
    expected: str
    recipe: str | None  # module of model.class_path when it is in lightdist.recipes


RECIPES_PACKAGE = "lightdist.recipes"


def recipes_root() -> Path:
    """The ``lightdist.recipes`` package directory: beside this one (found without importing it)."""
    return Path(__file__).resolve().parents[1] / "recipes"


def configs_root() -> Path:
    """The shipped configs: ``configs/`` inside ``lightdist.recipes`` (package data of the wheel)."""
    return recipes_root() / "configs"


def find_recipes(root: Path | None = None) -> list[RecipeInfo]:
    root = root or recipes_root()
    found = []
    for path in sorted(root.glob("*.py")):
        if path.name.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(), str(path))) or ""
        lines = [line.strip() for line in doc.splitlines()]
        if not lines or not lines[0].startswith("lightdist "):
            continue  # a helper module, not a recipe
        description = next((line for line in lines[1:] if line), "")
        found.append(RecipeInfo(path.stem, path, lines[0], description))
    return found


def find_configs(root: Path | None = None) -> list[ConfigInfo]:
    import yaml  # a dependency of jsonargparse

    root = root or configs_root()
    found = []
    for path in sorted(root.rglob("*.yaml")):
        text = path.read_text()
        comments = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
        command = next((c for c in comments if c.startswith("lightdist ")), "")
        # "expected: ..." or "expected (measured ...): ..."
        expected = next((c.split(":", 1)[1].strip() for c in comments if c.startswith("expected") and ":" in c), "")
        description = next((c for c in comments if c and c != command and ":" not in c.split(" ", 1)[0]), "")
        try:
            body = yaml.safe_load(text) or {}
            class_path = str(body.get("model", {}).get("class_path", ""))
        except (yaml.YAMLError, AttributeError):
            class_path = ""
        module, _, _ = class_path.rpartition(".")
        recipe = module.removeprefix(RECIPES_PACKAGE + ".") if module.startswith(RECIPES_PACKAGE + ".") else None
        found.append(
            ConfigInfo(str(path.relative_to(root).with_suffix("")), path, command, description, expected, recipe)
        )
    return found


def resolve_config_args(args: list[str]) -> list[str]:
    """Let ``--config digits/pretrain-cpu`` name a shipped config.

    Lookup order: a file at the path given, then the shipped config of that name (with or without
    ``.yaml``). When both exist the file wins and a note on stderr says so, as it does when a
    shipped config is taken while ``NAME.yaml`` exists here too (``lightdist cp``'s copy, say).
    """
    root = configs_root()
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = _resolve(out[i + 1], root)
        elif arg.startswith("--config="):
            out[i] = "--config=" + _resolve(arg.split("=", 1)[1], root)
    return out


def shipped_config(name: str, root: Path | None = None) -> Path | None:
    """The shipped config called ``name`` (``digits/pretrain-cpu``, ``.yaml`` optional), or None."""
    root = (root or configs_root()).resolve()
    if not name or Path(name).is_absolute():
        return None
    for candidate in (root / name, root / f"{name}.yaml"):
        # is_relative_to: a name like ../../x is not a shipped config, whatever it points at
        if candidate.suffix == ".yaml" and candidate.is_file() and candidate.resolve().is_relative_to(root):
            return candidate
    return None


def _resolve(value: str, root: Path) -> str:
    local, shipped = Path(value), shipped_config(value, root)
    if local.is_file():
        if shipped is not None and shipped.resolve() != local.resolve():
            _note(f"--config {value}: using the file {local.resolve()}, not the shipped config of that name")
        return value
    if shipped is None:
        return value  # jsonargparse reports the missing file, by the name the user gave
    here = Path(f"{value}.yaml")
    if here.is_file() and here.resolve() != shipped.resolve():
        _note(f"--config {value}: using the shipped config {shipped}; for the file here, pass --config {here}")
    return str(shipped)


def _note(text: str) -> None:
    print(f"lightdist: note: {text}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightdist recipes", description="List the recipes and configs on disk.")
    parser.parse_args(argv)
    recipes, configs = find_recipes(), find_configs()
    if not recipes and not configs:
        print(f"lightdist recipes: no recipes or configs found in {recipes_root()} (reinstall lightdist)")
        return 1
    width = max([len(r.name) for r in recipes] + [len(c.name) for c in configs] + [10]) + 2
    print(f"Recipes ({recipes_root()}):")
    for recipe in recipes:
        print(f"  {recipe.name:<{width}}{recipe.description}")
    print(f"\nConfigs ({configs_root()}), run with: lightdist fit --config <name>")
    for config in configs:
        print(f"  {config.name:<{width}}{config.description}")
        if config.expected:
            print(f"  {'':<{width}}expected: {config.expected}")
    print("\nTo edit one, copy it out: lightdist cp <name> my.yaml, then: lightdist fit --config my.yaml")
    return 0
