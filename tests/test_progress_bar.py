"""A pool call draws Lightning's own progress bar, in a real terminal (issue 15, item 3).

``tests/bar_script.py`` fits a small model once per progress bar (Lightning's tqdm and rich bars
with their defaults, a ``TQDMProgressBar`` subclass with its own ``get_metrics``, ``refresh_rate=2``
and ``leave=True``, a ``RichProgressBar`` with ``leave=True`` and a theme). It runs twice in a pty,
side by side: with ``strategy="ddp"`` (Lightning's own launcher, which re-runs the script for
rank 1; the reference) and with ``strategy="lightdist"``. :class:`tests.terminal.Screen` turns
each output into the lines a user sees, at the end and on the way, and the tests compare them:
the same bar lines, in the same form, a validation bar while validation runs; and lightdist's
screen has none of the glued or doubled lines that in-process Lightning leaves when
"`Trainer.fit` stopped" is logged while the bar is drawn.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.terminal import Screen, run_in_terminal

pytestmark = pytest.mark.timeout(300)  # two fresh interpreters with Lightning, side by side

SCRIPT = Path(__file__).with_name("bar_script.py")
ROOT = SCRIPT.parent.parent
COLUMNS, ROWS = 200, 50  # wide enough that no bar line wraps
STRATEGIES = ("ddp", "lightdist")

# A bar line, its numbers read as their format: what stays equal between two runs of one bar.
_TQDM = re.compile(
    r"^(?P<desc>[^:|]+): *(?:\d+%)?\|[^|]*\| (?P<count>\S+) \[[^,]+, *\S+(?P<post>[^\]]*)\](?P<rest>.*)$"
)
_RICH = re.compile(r"^(?P<desc>\S.*?) +[━╸╺ ]+ (?P<count>\d+/\S+) \S+ • \S+ [\d.]+it/s(?P<post>.*?)(?P<rest>`Tr.*)?$")


def number_formats(text: str) -> str:
    """``train_loss=0.826`` -> ``train_loss=<f3>``, ``8.57e-01`` -> ``<e2>``, ``2`` -> ``<i>``."""
    text = re.sub(r"-?\d+\.(\d+)e[+-]\d+", lambda m: f"<e{len(m.group(1))}>", text)
    text = re.sub(r"(?<![\w<])-?\d+\.(\d+)", lambda m: f"<f{len(m.group(1))}>", text)
    return re.sub(r"(?<![\w<])\d+(?![\w>])", "<i>", text)


def bar_line(line: str) -> tuple[str, str, str, str] | None:
    """``(description, batches, metrics with their number formats, text glued after it)``."""
    found = _TQDM.match(line) or _RICH.match(line)
    if found is None:
        return None
    return found["desc"].strip(), found["count"], number_formats(found["post"].strip(" ,")), found["rest"] or ""


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """strategy -> bar -> what that bar's fit wrote to the terminal."""
    cwd = tmp_path_factory.mktemp("bars")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")

    def run(strategy: str) -> tuple[int, str]:
        argv = [sys.executable, str(SCRIPT), strategy]
        return run_in_terminal(argv, cwd=cwd, env=env, columns=COLUMNS, rows=ROWS, timeout=240)

    with ThreadPoolExecutor(len(STRATEGIES), thread_name_prefix="test-terminal") as pool:
        runs = dict(zip(STRATEGIES, pool.map(run, STRATEGIES)))
    out: dict[str, dict[str, str]] = {}
    for strategy, (status, output) in runs.items():
        assert status == 0, f"{strategy}:\n" + "\n".join(Screen.of(output, COLUMNS, ROWS)[-40:])
        parts = re.split(r"=== (\S+) ===\r?\n", output)
        out[strategy] = dict(zip(parts[1::2], parts[2::2]))
    return out


def final_bars(output: str) -> list[tuple[str, str, str, str]]:
    return [bar for bar in map(bar_line, Screen.of(output, COLUMNS, ROWS)) if bar is not None]


def unique(bars: list[tuple[str, str, str, str]]) -> list[tuple[str, str, str]]:
    """In-process Lightning's lines without its doubles (the last bar redrawn after a glued line)."""
    seen: list[tuple[str, str, str]] = []
    for desc, count, metrics, _ in bars:
        if (desc, count, metrics) not in seen:
            seen.append((desc, count, metrics))
    return seen


def training(bars: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    return [bar for bar in bars if bar[0].startswith(("Epoch", "Training"))]


def frames(output: str) -> Iterator[list[tuple[str, str, str, str]]]:
    for lines in Screen.frames(output, COLUMNS, ROWS):
        yield [bar for bar in map(bar_line, lines) if bar is not None]


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_one_training_bar_in_place_as_lightning_draws_it(drawn: dict[str, dict[str, str]], bar: str) -> None:
    reference = training(unique(final_bars(drawn["ddp"][bar])))
    ours = final_bars(drawn["lightdist"][bar])
    assert training([b[:3] for b in ours]) == reference, (ours, reference)
    # one bar for the whole fit, redrawn in place across the epochs: no leftover line per epoch
    (desc, count, metrics, _) = ours[0]
    assert len(ours) == 1 and count == "4/4", ours
    if bar == "tqdm":
        assert desc == "Epoch 1" and metrics == "train_loss=<f3>, val_loss=<f3>", ours
    else:
        assert desc == "Epoch 1/1" and metrics == "train_loss: <f3> val_loss: <f3>", ours


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_a_validation_bar_shows_while_validation_runs(drawn: dict[str, dict[str, str]], bar: str) -> None:
    for strategy in STRATEGIES:
        pairs = {
            (above[0].split()[0], below[0].split()[0])
            for shown in frames(drawn[strategy][bar])
            for above, below in zip(shown, shown[1:])
        }
        assert ("Epoch", "Validation") in pairs, f"{strategy}: no validation bar under the epoch's: {pairs}"


def test_a_subclass_and_its_settings_are_honoured(drawn: dict[str, dict[str, str]]) -> None:
    for bar in ("tqdm-subclass", "rich-theme"):
        reference = training(unique(final_bars(drawn["ddp"][bar])))
        ours = final_bars(drawn["lightdist"][bar])
        assert [b[:3] for b in ours] == reference, (bar, ours, reference)
    # the subclass's get_metrics, and leave=True: one line per epoch
    subclass = [b[:3] for b in final_bars(drawn["lightdist"]["tqdm-subclass"]) if b[0].startswith("Epoch")]
    assert subclass == [(f"Epoch {e}", "4/4", "train_loss=<f3>, epoch_seen=<i>") for e in range(2)], subclass
    # refresh_rate=2: the bar is drawn at batches 2 and 4 only, as in-process
    counts = {b[1] for shown in frames(drawn["lightdist"]["tqdm-subclass"]) for b in shown if b[0].startswith("Epoch")}
    assert counts == {"0/4", "2/4", "4/4"}, counts
    # the theme's metrics format and delimiter, and leave=True
    themed = [b[:3] for b in final_bars(drawn["lightdist"]["rich-theme"])]
    assert themed == [(f"Epoch {e}/1", "4/4", "train_loss: <e2> | val_loss: <e2>") for e in range(2)], themed


@pytest.mark.parametrize("bar", ["tqdm", "rich", "tqdm-subclass", "rich-theme"])
def test_no_line_is_glued_to_a_bar_or_doubled(drawn: dict[str, dict[str, str]], bar: str) -> None:
    lines = Screen.of(drawn["lightdist"][bar], COLUMNS, ROWS)
    bars = [b for b in map(bar_line, lines) if b is not None]
    assert all(glued == "" for *_, glued in bars), bars
    assert len(set(bars)) == len(bars), bars
    stopped = [line for line in lines if "Trainer.fit` stopped" in line]
    assert len(stopped) == 1 and re.fullmatch(r"(\[rank 0\] )?`Trainer\.fit` stopped: .*reached\.", stopped[0]), lines
