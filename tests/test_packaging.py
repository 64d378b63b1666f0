"""Packaging: a real wheel carries the recipes and their configs; ``lightdist cp``; ``--config`` lookup;
the extras (the ``lightning`` extra pulls no scikit-learn, the README's main job installs what it runs).

The wheel test builds the wheel from a copy of the source (pip, no build isolation: nothing is
downloaded), installs it with pip into a fresh venv and runs its console script from an empty
directory, with torch and Lightning taken from this venv but scikit-learn and scipy left out, as the
``lightning`` extra installs them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from lightdist.cli import _catalog
from lightdist.cli import main as cli_main
from tests.cli_helpers import ROOT

LEFT_OUT = ("sklearn", "scikit_learn", "scipy")  # what the `recipes` extra adds to `lightning`


def run(argv: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(map(str, argv)), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"  # a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lightdist", src / "lightdist", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", tmp / "dist", src], tmp)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp / "dist").glob("lightdist-*.whl")
    return wheel


def venv_with(wheel: Path, tmp: Path) -> Path:
    """A fresh venv with the wheel installed by pip; this venv's packages minus LEFT_OUT behind it."""
    venv = tmp / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", python]
    installed = run([*pip, "install", "--no-deps", "--no-index", "-q", wheel], tmp)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # Links to this venv's packages, LEFT_OUT and its own lightdist excepted, named by a .pth line
    # (after the venv's own site-packages; .pth files inside it, e.g. the editable install's, are
    # not run from there).
    shared = tmp / "shared"
    shared.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if not entry.name.lower().startswith((*LEFT_OUT, "lightdist", "__editable__")):
            (shared / entry.name).symlink_to(entry)
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    (site / "shared.pth").write_text(f"{shared}\n")
    return venv


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def requirements(wheel: Path) -> list[str]:
    """The wheel's ``Requires-Dist`` lines, as pip reads them."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    return re.findall(r"^Requires-Dist: (.*)$", metadata, re.M)


def pulled_by(requires: list[str], extras: set[str]) -> set[str]:
    """The distributions that ``pip install lightdist[extras]`` installs, ``lightdist[...]`` resolved."""
    names: set[str] = set()
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for line in requires:
            requirement, _, marker = line.partition(";")
            if marker.strip() not in (f'extra == "{extra}"', f"extra == '{extra}'"):
                continue
            self_ref = re.fullmatch(r"lightdist\[([\w,]+)\]", requirement.strip())
            if self_ref:
                todo += [e for e in self_ref.group(1).split(",") if e not in seen]
            else:
                names.add(re.split(r"[<>=!~\[ ]", requirement.strip())[0].lower())
    return names


def test_extras_and_the_readme_main_job(wheel: Path) -> None:
    requires = requirements(wheel)
    assert "lightning" in pulled_by(requires, {"lightning"})
    assert not {"scikit-learn", "scipy"} & pulled_by(requires, {"lightning"}), "own-model users need no sklearn"
    readme = (ROOT / "README.md").read_text()
    main_job = next(line for line in readme.splitlines() if "pip install" in line and "lightdist fit" in line)
    installed = re.search(r'-e "\.\[([\w,]+)\]"', main_job)
    assert installed, main_job
    extras = set(installed.group(1).split(","))
    assert "scikit-learn" in pulled_by(requires, extras), "the quickstart trains on scikit-learn's digits"
    configs = re.findall(r"--config (\S+)", main_job)
    assert configs and all(_catalog.shipped_config(name) is not None for name in configs), configs
    # CI installs the dev extra: it has everything the README's main job and the wheel test need
    assert '-e ".[dev]"' in (ROOT / ".ci" / "run").read_text()
    assert pulled_by(requires, {"dev"}) >= pulled_by(requires, extras) | {"setuptools", "pytest"}


# About 20 s of CPU (pip twice, a Lightning import twice); a shared, loaded machine stretches the wall time.
@pytest.mark.timeout(300)
def test_wheel_ships_the_configs_and_runs_them_from_any_directory(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert {name.split("/")[0] for name in names} == {"lightdist", "lightdist-0.1.0.dist-info"}, "one import name"
    shipped = {str(p.relative_to(ROOT)) for p in _catalog.configs_root().rglob("*.yaml")}
    assert shipped and shipped <= set(names), "every config is in the wheel"

    venv = venv_with(wheel, tmp_path)
    lightdist = venv / "bin" / "lightdist"  # the console script pip wrote
    work = tmp_path / "work"  # no configs/ here, no checkout on the path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

    listed = run([lightdist, "recipes"], work, env)
    assert listed.returncode == 0, listed.stderr
    assert f"Recipes ({venv}/lib/" in listed.stdout and "  digits/pretrain-cpu " in listed.stdout
    copied = run([lightdist, "cp", "digits/pretrain-cpu", "my.yaml"], work, env)
    assert copied.returncode == 0 and "lightdist fit --config my.yaml" in copied.stdout, copied.stderr
    again = run([lightdist, "cp", "digits/pretrain-cpu", "my.yaml"], work, env)
    assert (
        again.returncode == 2
        and again.stderr == "lightdist cp: error: 'my.yaml' exists; pass --force to overwrite it\n"
    )

    # A config of before the rename names the model by the old top-level package `recipes`.
    (work / "old.yaml").write_text("model:\n  class_path: recipes.digits.DigitsClassifier\n")
    printed = run(
        [lightdist, "fit", "--config", "digits/pretrain-cpu", "--config", "old.yaml", "--print_config"], work, env
    )
    assert printed.returncode == 0, printed.stderr
    config = yaml.safe_load(printed.stdout)
    assert config["data"]["class_path"] == "lightdist.recipes.digits.DigitsDataModule"  # the wheel's config
    assert config["model"]["class_path"].endswith("recipes.digits.DigitsClassifier")
    assert config["trainer"]["max_epochs"] == 15 and config["model"]["init_args"]["num_classes"] == 5
    assert "FutureWarning: recipes.digits is now lightdist.recipes.digits" in printed.stderr
    assert sorted(p.name for p in work.iterdir()) == ["my.yaml", "old.yaml"], "print_config writes nothing"

    # Without scikit-learn (the `lightning` extra alone) the digits recipe says which extra it needs.
    probe = "from lightdist.recipes.digits import DigitsDataModule as D\ntry: D()\nexcept Exception as e: print(e)"
    missing = run([venv / "bin" / "python", "-c", probe], work, env)
    assert "pip install 'lightdist[recipes]'" in missing.stdout, missing.stdout + missing.stderr


def test_cp_copies_a_shipped_config_and_refuses_to_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = _catalog.configs_root() / "digits/finetune-cpu.yaml"
    assert cli_main(["cp", "digits/finetune-cpu", "mine.yaml"]) == 0
    assert (tmp_path / "mine.yaml").read_bytes() == shipped.read_bytes()
    assert "Run it with: lightdist fit --config mine.yaml" in capsys.readouterr().out
    (tmp_path / "mine.yaml").write_text("edited")
    assert cli_main(["cp", "digits/finetune-cpu", "mine.yaml"]) == 2
    assert capsys.readouterr().err == "lightdist cp: error: 'mine.yaml' exists; pass --force to overwrite it\n"
    assert (tmp_path / "mine.yaml").read_text() == "edited", "untouched without --force"
    assert cli_main(["cp", "digits/finetune-cpu.yaml", "mine.yaml", "--force"]) == 0
    assert (tmp_path / "mine.yaml").read_bytes() == shipped.read_bytes()
    (tmp_path / "into").mkdir()
    assert cli_main(["cp", "digits", "into"]) == 0  # a recipe's module, into a directory
    assert (tmp_path / "into/digits.py").read_bytes() == (_catalog.recipes_root() / "digits.py").read_bytes()
    capsys.readouterr()

    assert cli_main(["cp", "digits/nope", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no shipped config or recipe named 'digits/nope'" in err
    assert all(c.name in err for c in _catalog.find_configs()) and "recipes: digits, " in err
    assert cli_main(["cp", "digits/pretrain-cpu", "missing/x.yaml"]) == 2
    assert capsys.readouterr().err == "lightdist cp: error: directory 'missing' does not exist (create it first)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["into", "mine.yaml"], "no temporary file left"


def test_config_lookup_prefers_a_file_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    shipped = str(_catalog.configs_root() / "digits/pretrain-cpu.yaml")
    assert _catalog.resolve_config_args(["--config", "digits/pretrain-cpu"]) == ["--config", shipped]
    assert capsys.readouterr().err == "", "not ambiguous: no note"
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits/pretrain-cpu.yaml").write_text("seed_everything: 1\n")
    # the file here and a shipped config share a name: the file wins, and a note says so
    assert _catalog.resolve_config_args(["--config=digits/pretrain-cpu.yaml"]) == ["--config=digits/pretrain-cpu.yaml"]
    note = capsys.readouterr().err
    assert (
        note.startswith("lightdist: note: --config digits/pretrain-cpu.yaml: using the file ") and note.count("\n") == 1
    )
    assert "not the shipped config" in note
    # the short name is no file path: the shipped config, with a note pointing at the file here
    assert _catalog.resolve_config_args(["--config", "digits/pretrain-cpu"]) == ["--config", shipped]
    assert "pass --config digits/pretrain-cpu.yaml" in capsys.readouterr().err
    # neither: left as given, for the parser (tests/test_cli.py checks its one-line error)
    assert _catalog.resolve_config_args(["--config", "digits/x"]) == ["--config", "digits/x"]
