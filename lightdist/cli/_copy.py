"""``lightdist cp``: copy a shipped config (or a recipe's module) out to edit, as torchtune's ``tune cp``.

::

    lightdist cp digits/pretrain-cpu my.yaml            # then: lightdist fit --config my.yaml
    lightdist cp digits/pretrain-cpu experiments/       # into a directory: experiments/pretrain-cpu.yaml
    lightdist cp digits/pretrain-cpu my.yaml --force    # overwrite my.yaml
    lightdist cp digits my_digits.py                    # a recipe's module, to change the model itself

The shipped configs are installed with the package (``lightdist recipes`` lists them), so this works
from a wheel as from a source checkout. Nothing is overwritten without ``--force``, and the copy is
written beside the destination and renamed into place: never a half-written file. Like ``lightdist
recipes``, it imports neither torch nor the recipes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from lightdist.cli._catalog import find_configs, find_recipes, shipped_config

__all__ = ["main"]

PROG = "lightdist cp"


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _source(name: str) -> tuple[Path, str | None] | None:
    """The file ``name`` means and, for a config, the command word that runs it (fit, test...)."""
    config = shipped_config(name)
    if config is not None:
        info = next((c for c in find_configs() if c.path.resolve() == config.resolve()), None)
        words = info.command.split() if info is not None else []
        return config, words[1] if len(words) > 1 else "fit"
    recipe = next((r for r in find_recipes() if name in (r.name, f"{r.name}.py")), None)
    return (recipe.path, None) if recipe is not None else None


def _copy(source: Path, destination: Path) -> None:
    # a temporary file beside the destination, renamed over it: a reader (or a crash) never sees half
    fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out)
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Copy a shipped config (or a recipe's module) to a file you can edit.",
        epilog="Example: lightdist cp digits/pretrain-cpu my.yaml && lightdist fit --config my.yaml",
    )
    parser.add_argument("name", help="a config (digits/pretrain-cpu) or recipe (digits), as lightdist recipes lists")
    parser.add_argument("destination", help="the file to write, or an existing directory to write it into")
    parser.add_argument("--force", action="store_true", help="overwrite the destination if it exists")
    args = parser.parse_args(argv)

    found = _source(args.name)
    if found is None:
        configs = ", ".join(c.name for c in find_configs())
        recipes = ", ".join(r.name for r in find_recipes())
        return _error(f"no shipped config or recipe named {args.name!r} (configs: {configs}; recipes: {recipes})")
    source, command = found
    destination = Path(args.destination)
    if destination.is_dir():
        destination = destination / source.name
    if destination.is_dir():
        return _error(f"{str(destination)!r} is a directory")
    if not destination.parent.is_dir():
        return _error(f"directory {str(destination.parent)!r} does not exist (create it first)")
    if destination.exists():
        if destination.resolve() == source.resolve():
            return _error(f"{str(destination)!r} is the shipped file itself; copy it somewhere else")
        if not args.force:
            return _error(f"{str(destination)!r} exists; pass --force to overwrite it")
    try:
        _copy(source, destination)
    except OSError as exc:
        return _error(f"cannot write {str(destination)!r}: {exc.strerror or exc}")
    print(f"Copied {source} to {destination}")
    if command is not None:
        print(f"Run it with: lightdist {command} --config {destination}")
    else:
        print(f"Name its classes as {destination.stem}.<Class> (in a config's class_path, or --model/--data)")
    return 0
