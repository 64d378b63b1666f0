"""The ``lightdist`` console script, run for real in subprocesses (issue: recipes, configs and CLI).

The digits quickstart runs end to end here exactly as the README runs it (pretrain, fine-tune from
that checkpoint, test on held-out images, predict), once per module; the other tests use tiny
settings. Every run goes through ``tests.cli_helpers.run_cli``, which fails a test that leaves a
worker process behind.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sklearn  # noqa: F401  (sets KMP_* variables when first imported: here, not inside a checked test)
import yaml
from jsonargparse import ArgumentError
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightdist.cli import _catalog
from lightdist.cli import main as cli_main
from lightdist.cli._hparams import typed_values, write_session
from lightdist.cli._lightning import LightdistCLI, explain, run_trainer_command
from lightdist.cli._sweep import main as sweep_main
from lightdist.cli._sweep import split_values
from lightdist.recipes.digits import DigitsDataModule
from tests.cli_helpers import CONFIGS, ROOT, Board, assert_nothing_left, poll_json, run_cli, start_cli
from tests.conftest import wait_until
from tests.terminal import Screen

# The README states this held-out accuracy for the quickstart; measured 0.96-0.98 (docs/recipes.md).
QUICKSTART_TEST_ACC = 0.9
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.log_every_n_steps=1",
]


def all_configs() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml"))


def scalars(log_dir: Path) -> dict[str, list[float]]:
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """For the CLI's functions called in this process: seed_everything sets these; put them back."""
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str]]:
    """The README's main job: pretrain on digits 0-4, then fine-tune that checkpoint on 5-9."""
    cwd = tmp_path_factory.mktemp("quickstart")
    pretrain = run_cli("fit", "--config", "digits/pretrain-cpu", cwd=cwd, timeout=110)  # shipped configs, by
    finetune = run_cli("fit", "--config", "digits/finetune-cpu", cwd=cwd, timeout=110)  # name, as the README
    yield cwd, pretrain.stdout, finetune.stdout


def test_help_and_unknown_command(tmp_path: Path) -> None:
    assert "fit, validate, test, predict" in run_cli("--help", cwd=tmp_path).stdout
    bad = run_cli("fitt", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "unknown command 'fitt'" in bad.stderr


def test_recipes_lists_what_is_on_disk(tmp_path: Path) -> None:
    out = run_cli("recipes", cwd=tmp_path).stdout
    recipe_files = [p for p in (ROOT / "lightdist" / "recipes").glob("*.py") if not p.name.startswith("_")]
    recipes = [p.stem for p in recipe_files if p.read_text().lstrip('"').startswith("lightdist ")]
    assert "digits" in recipes
    for name in recipes:
        assert f"  {name} " in out
    for config in all_configs():
        assert f"  {config.relative_to(CONFIGS).with_suffix('')} " in out
    assert "tiny_models" not in out  # a helper module, not a recipe: its docstring has no command


@pytest.mark.parametrize("config", all_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_parses_through_the_cli(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = config.read_text()
    first = text.splitlines()[0]
    name = str(config.relative_to(CONFIGS).with_suffix(""))
    assert first.startswith("# lightdist ") and first.endswith(f" --config {name}"), "open with the run command"
    assert re.search(r"^# expected[^:\n]*: \S", text, re.M) and "MEASURE-ME" not in text, "state the measured result"
    with pytest.raises(SystemExit) as exit_info:
        LightdistCLI(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["strategy"] == "lightdist"  # the CLI's default, not repeated in configs
    assert printed["model"]["class_path"].startswith("lightdist.recipes.")


def test_print_config_and_overrides_through_the_console_scripts_main(
    tmp_path: Path, in_process: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # lightdist.cli.main, the console script's entry point, in-process: a config name, overrides
    # and --print_config go through the same path as on the command line (a subprocess costs ~9 s
    # of imports; the quickstart and the bad-input test run the real script).
    in_process.chdir(tmp_path)
    args = ["fit", "--config", "digits/pretrain-cpu", "--trainer.max_epochs=3", "--model.lr=0.01", "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 3 and printed["model"]["init_args"]["lr"] == 0.01
    assert not (tmp_path / "runs").exists()


def test_the_console_script_finds_a_model_module_in_the_working_directory(tmp_path: Path) -> None:
    # `python -m lightdist.cli` has the working directory on sys.path; the console script has its
    # bin directory there instead, so `--model mymod.Reg` failed with "No module named 'mymod'".
    (tmp_path / "mymod.py").write_text(
        "import lightning as L\n\n\nclass Reg(L.LightningModule):\n"
        "    def __init__(self, width: int = 4) -> None:\n        super().__init__()\n"
    )
    out = run_cli("fit", "--model", "mymod.Reg", "--model.width=3", "--print_config", cwd=tmp_path).stdout
    assert yaml.safe_load(out)["model"] == {"class_path": "mymod.Reg", "init_args": {"width": 3}}


def test_a_config_that_is_neither_a_file_nor_shipped_is_one_line(
    tmp_path: Path, in_process: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    in_process.chdir(tmp_path)
    assert cli_main(["fit", "--config", "digits/pretrain", "--print_config"]) == 2  # a typo of a shipped name
    assert capsys.readouterr().err == (
        f"lightdist fit: error: --config {tmp_path}/digits/pretrain: no such file, and no shipped config of that "
        "name (lightdist recipes lists them) (see: lightdist fit --help)\n"
    )


def test_quickstart_pretrain_then_finetune(quickstart: tuple[Path, str, str]) -> None:
    cwd, pretrain_out, finetune_out = quickstart
    for stage, out in (("pretrain", pretrain_out), ("finetune", finetune_out)):
        assert f"lightdist tensorboard --logdir runs/digits/{stage}" in out  # where to watch it
        assert f"Final checkpoint: {cwd / 'runs/digits' / stage / 'checkpoints/last.ckpt'}" in out
        curves = scalars(cwd / "runs/digits" / stage / "version_0")
        assert len(curves["train_loss"]) >= 10 and curves["val_acc"][-1] >= 0.9
    assert "val_acc=" in finetune_out


def test_quickstart_test_reaches_the_stated_accuracy(quickstart: tuple[Path, str, str]) -> None:
    cwd = quickstart[0]
    ckpt = cwd / "runs/digits/finetune/checkpoints/last.ckpt"
    out = run_cli("test", "--config", "digits/finetune-cpu", "--ckpt_path", ckpt, cwd=cwd).stdout
    test_acc = float(out.split("test_acc=")[1].split(",")[0])
    assert test_acc >= QUICKSTART_TEST_ACC, out


def test_predict_loads_the_checkpoint_and_writes_predictions(quickstart: tuple[Path, str, str]) -> None:
    cwd = quickstart[0]
    ckpt = cwd / "runs/digits/finetune/checkpoints/last.ckpt"
    target = cwd / "predictions.jsonl"
    out = run_cli(
        "predict", "--config", "digits/finetune-cpu", "--ckpt_path", ckpt, "--predictions_file", target, cwd=cwd
    ).stdout
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert f"wrote {len(rows)} predictions" in out
    held_out = DigitsDataModule(classes=[5, 6, 7, 8, 9])
    held_out.setup("predict")
    assert len(rows) == len(held_out.splits["test"])  # every rank's share, no sampler padding
    assert {row["label"] for row in rows} == {5, 6, 7, 8, 9}
    assert sum(row["predicted"] == row["label"] for row in rows) / len(rows) >= QUICKSTART_TEST_ACC
    # (an untrained model is at chance, 0.2: the accuracy above proves the checkpoint was loaded)


BAD_INPUT = [
    ("--model.nope=1", "model.nope"),
    ("--model.lr=fast", "model.lr"),
    ("--data.batch_size=0", "data.batch_size"),
    ("--trainer.max_epochz=2", "--trainer.max_epochz"),
    ("--model.pretrained=missing.ckpt", "missing.ckpt"),
    ("--config=nowhere.yaml", "nowhere.yaml"),
]


def test_bad_input_in_the_console_script_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    proc = run_cli("fit", "--config", "digits/pretrain-cpu", "--model.nope=1", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "lightdist fit: error: model.nope: no such argument of lightdist.recipes.digits.DigitsClassifier "
        "(see: lightdist fit --help)"
    ]
    assert not (tmp_path / "runs").exists(), "nothing half written"  # run_cli also checks no process is left


@pytest.mark.parametrize(("override", "names"), BAD_INPUT)
def test_bad_input_is_one_line_naming_the_key(
    tmp_path: Path, in_process: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], override: str, names: str
) -> None:
    # The console script's own function, in-process (a subprocess per case costs 5 s of imports):
    # the classes are built before any worker starts, so nothing can be left running either way.
    in_process.chdir(tmp_path)
    assert run_trainer_command("fit", ["--config", "digits/pretrain-cpu", override]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and names in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists(), "nothing half written"


def test_a_mismatch_found_on_the_ranks_is_still_one_line(tmp_path: Path) -> None:
    proc = run_cli(
        "fit",
        "--config",
        "digits/finetune-cpu",
        "--model.num_classes=4",
        "--model.pretrained=null",
        *TINY,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "model.num_classes=4 but data.classes has 5 classes" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs/digits/finetune/checkpoints").exists()


def test_ctrl_c_stops_the_fit_and_every_process(tmp_path: Path) -> None:
    proc, mark = start_cli("fit", "--config", "digits/pretrain-cpu", "--trainer.max_epochs=100000", cwd=tmp_path)
    try:
        events = tmp_path / "runs/digits/pretrain/version_0"
        assert wait_until(lambda: any(events.glob("events.*")) and proc.poll() is None, 90), "training never started"
        time.sleep(1.0)  # well inside the fit
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 130, out[-2000:]
    assert "interrupted" in out and "Traceback" not in out
    assert_nothing_left(mark, "an interrupted lightdist fit")


def test_sweep_runs_every_combination_on_one_pool(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    with_bar = [arg for arg in TINY if not arg.startswith("--trainer.enable_progress_bar")]
    drawn = run_cli(
        "sweep",
        "--config",
        "digits/pretrain-cpu",
        "--grid",
        "model.lr=1e-3,3e-3",
        "--grid",
        "data.batch_size=16,32",
        "--sweep_dir",
        sweep_dir,
        *with_bar,
        cwd=tmp_path,
        terminal=True,  # what a user's terminal shows: Lightning's bar between the sweep's lines
    ).stdout
    lines = Screen.of(drawn)
    out = "\n".join(lines)
    # one bar per combination, each finished before the combination's line: nothing glued, nothing doubled
    bars = [line for line in lines if re.match(r"Epoch 0/0 +━+ 2/2 ", line)]
    done = [line for line in lines if re.match(r"\[\d/4\] ", line)]
    assert len(bars) == 4 and len(done) == 4 and not any("━" in line for line in done), out
    assert [lines.index(line) for line in done] == sorted(lines.index(line) for line in done), out
    rows = [json.loads(line) for line in (sweep_dir / "results.jsonl").read_text().splitlines()]
    assert [row["overrides"] for row in rows] == [
        {"model.lr": lr, "data.batch_size": bs} for lr in ("1e-3", "3e-3") for bs in ("16", "32")
    ]
    assert all(row["error"] is None and "val_acc" in row["metrics"] for row in rows)
    assert len({tuple(row["rank_pids"]) for row in rows}) == 1 and len(rows[0]["rank_pids"]) == 2, rows
    # (the same two rank processes ran every combination: one warm pool for the whole sweep)
    header = next(line for line in out.splitlines() if line.startswith("model.lr"))
    assert "data.batch_size" in header and "val_acc" in header
    for row in rows:  # one TensorBoard run per combination, side by side under the sweep directory
        assert len(scalars(sweep_dir / row["run"])["train_loss"]) == 2
        assert (sweep_dir / row["run"] / "checkpoints/last.ckpt").is_file()
    # the metrics differ per combination: the overrides reached the model and the data
    assert len({row["metrics"]["train_loss"] for row in rows}) == 4
    assert_hparams_tab(sweep_dir, rows, tmp_path)


def assert_hparams_tab(sweep_dir: Path, rows: list[dict[str, Any]], tmp_path: Path) -> None:
    """A real TensorBoard server's HParams tab: each combination's values with its final metrics."""
    board = Board("tensorboard", "--logdir", sweep_dir, stderr=tmp_path / "tensorboard.stderr")
    try:
        url = board.url() + "data/plugin/hparams/"
        metric_names = set(rows[0]["metrics"])
        # (TensorBoard reads the logdir in a thread: ask until all of it is there)
        experiment = poll_json(
            url + "experiment", None, lambda e: bool(e.get("metricInfos")), post={"experimentName": ""}
        )
        columns = {info["name"]: info["domainDiscrete"] for info in experiment["hparamInfos"]}
        assert columns == {"model.lr": [0.001, 0.003], "data.batch_size": [16, 32]}  # numbers, not strings
        metrics = {info["displayName"]: info["name"] for info in experiment["metricInfos"]}
        assert set(metrics) == metric_names and metric_names >= {"val_acc", "train_loss"}
        request = {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"hparam": name} for name in columns] + [{"metric": name} for name in metrics.values()],
            "startIndex": 0,
            "sliceSize": 10,
        }

        def complete(answer: dict[str, Any]) -> bool:
            groups = answer.get("sessionGroups", [])
            return len(groups) == len(rows) and all(len(g["metricValues"]) == len(metrics) for g in groups)

        answer = poll_json(url + "session_groups", None, complete, post=request)
        groups = {group["name"]: group for group in answer["sessionGroups"]}
        for row in rows:
            group = groups[row["run"]]
            assert group["hparams"] == {key: float(value) for key, value in row["overrides"].items()}
            assert [session["status"] for session in group["sessions"]] == ["STATUS_SUCCESS"]
            shown = {value["name"]["tag"].removeprefix("final/"): value["value"] for value in group["metricValues"]}
            assert shown == pytest.approx(row["metrics"], rel=1e-6), "the sweep's final metrics, as its table has them"
        assert board.stop(signal.SIGINT) == 0
    finally:
        board.kill()


def test_sweep_refuses_bad_grids_and_used_directories(
    tmp_path: Path, in_process: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    in_process.chdir(tmp_path)
    (tmp_path / "old" / "lr=1").mkdir(parents=True)
    cases = [
        (["--grid", "model.lr"], "expected KEY=V1,V2"),
        (["--grid", "model.nope=1,2"], "model.nope: no such argument"),
        (["--grid", "model.lr=1e-3,", "--grid", "data.batch_size=8"], "an empty value"),
        (["--grid", "model.lr=1,2", "--grid", "model.lr=3"], "given twice"),
        (["--grid", "model.lr=1e-3,1e-2", "--sweep_dir", "old"], "already holds runs"),
    ]
    for grid, message in cases:
        assert sweep_main(["--config", "digits/pretrain-cpu", *grid, *TINY]) == 2
        err = capsys.readouterr().err
        assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"], "nothing written"


def test_hparams_types_and_a_failed_combination(tmp_path: Path) -> None:
    """Grid values are typed as TensorBoard compares them; a failed combination is a failed session."""
    from tensorboard.plugins.hparams import api_pb2, metadata

    assert typed_values(["1e-3", "16"]) == [0.001, 16.0] and typed_values(["True", "false"]) == [True, False]
    assert typed_values(["16", "auto"]) == ["16", "auto"]  # mixed: all strings, one type per column
    run = tmp_path / "act=relu,lr=1"
    write_session(run, {"model.act": "relu", "model.lr": 1.0}, {}, step=0, started=1.0, status="failure")
    events = EventAccumulator(str(run))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.group_name == run.name and start.start_time_secs == 1.0
    assert start.hparams["model.act"].string_value == "relu" and start.hparams["model.lr"].number_value == 1.0
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_FAILURE


def test_split_values_respects_brackets_and_quotes() -> None:
    assert split_values("1e-3,[1,2],'a,b',x") == ["1e-3", "[1,2]", "'a,b'", "x"]


def test_explain_keeps_only_the_class_complaint() -> None:
    with pytest.raises(ArgumentError) as info:
        LightdistCLI(["fit", "--config", str(CONFIGS / "digits/pretrain-cpu.yaml"), "--data.classes=oops"])
    assert explain(info.value).startswith("data.classes:")


def test_config_names_resolve_to_shipped_files() -> None:
    assert _catalog.resolve_config_args(["--config", "digits/pretrain-cpu"]) == [
        "--config",
        str(CONFIGS / "digits/pretrain-cpu.yaml"),
    ]
    assert _catalog.resolve_config_args(["--config=digits/pretrain-cpu.yaml"]) == [
        "--config=" + str(CONFIGS / "digits/pretrain-cpu.yaml")
    ]
    assert _catalog.resolve_config_args(["--config", "nowhere"]) == ["--config", "nowhere"]
