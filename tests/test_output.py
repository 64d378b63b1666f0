"""Rank output policy without a pool: records (lightdist._output) and the driver's output settings
shipped to a rank and restored after the call (lightdist._output_state).

"The rank" here is this process inside ``applied()``: what a TrainerWorker does around each call.
The end-to-end checks with real ranks are in tests/test_lightning_output.py.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator

import lightning.pytorch  # noqa: F401 - a driver has Lightning's loggers (and its handlers)
import pytest

from lightdist import protocol
from lightdist._output import LIBRARY, WARNING, RankStream, WarningCopies, encode_record, split_record
from lightdist._output_state import OutputState, applied, capture


def test_a_record_is_one_line_that_splits_back_into_its_text() -> None:
    text = 'summary\n┏━━━┓ "quoted" \\ \r\n' + "x" * 200_000  # several records' worth
    encoded = encode_record(LIBRARY, text)
    lines = encoded.encode().split(b"\n")[:-1]
    assert len(lines) == 4, "a long text is cut into several records (the template cuts lines over 1 MiB)"
    parts = [split_record(line) for line in lines]
    assert all(plain == b"" and record is not None and record[0] == LIBRARY for plain, record in parts)
    assert "".join(record[1] for _, record in parts if record is not None) == text
    # An unfinished print before a record stays plain text; a line without a record is plain.
    assert split_record(b"50%" + encode_record(WARNING, "w\n").encode()[:-1]) == (b"50%", (WARNING, "w\n"))
    assert split_record(b"[1/3] plain") == (b"[1/3] plain", None)
    # A record mark in a line that is no record (a cut one, a binary print) passes as plain text.
    for junk in (b'\x1eL"unterminated', b"\x1eX" + b'"kind"', b"\x1eL42"):
        assert split_record(junk) == (junk, None)


def test_identical_warnings_of_several_ranks_show_once() -> None:
    copies = WarningCopies(limit=3)
    assert copies.admit(101, "w1") is True  # rank 1 first
    assert copies.admit(100, "w1") is False  # rank 0's identical copy
    assert copies.admit(100, "w1") is True  # rank 0 raised it again ("always"): a second copy shows
    assert copies.admit(101, "w1") is False  # ... once
    assert copies.admit(102, "w1") is False  # a respawned rank's first copy is not a new one
    assert copies.admit(100, "w2") is True
    for n in range(5):  # bounded: the oldest warnings are forgotten
        copies.admit(100, f"other {n}")
    assert copies.admit(101, "w1") is True


def test_rank_stream_marks_the_writes_of_lightning_code() -> None:
    raw = io.StringIO()
    stream = RankStream(raw)
    print("a user print", file=stream)
    logger = logging.getLogger("lightdist.test.rank_stream")
    logger.propagate = False
    logger.addHandler(logging.StreamHandler(stream))
    logger.warning("a user log line")
    # Written by Lightning's code (a module of Lightning's): a log line through a handler, and a print.
    lightning_code = compile("log.warning('`Trainer.fit` stopped: test')\nprint('summary', file=stream)", "<l>", "exec")
    exec(lightning_code, {"__name__": "lightning.pytorch.loops.x", "log": logger, "stream": stream})
    lines = raw.getvalue().encode().split(b"\n")[:-1]
    assert lines[:2] == [b"a user print", b"a user log line"]
    records = [split_record(line)[1] for line in lines[2:]]
    assert records == [(LIBRARY, "`Trainer.fit` stopped: test\n"), (LIBRARY, "summary"), (LIBRARY, "\n")]
    logger.handlers.clear()
    logger.propagate = True


@pytest.fixture()
def rank_state() -> Iterator[None]:
    """This process plays the rank: its warning filters, Lightning loggers and COLUMNS are put back."""
    names = ("", "lightning.pytorch", "lightdist.test.configured")
    loggers = [logging.getLogger(n) for n in names]
    saved = {lg: (lg.level, lg.disabled, lg.propagate, list(lg.handlers)) for lg in loggers}
    columns = os.environ.get("COLUMNS")
    with warnings.catch_warnings():
        yield
    for lg, (level, disabled, propagate, handlers) in saved.items():
        lg.setLevel(level)
        lg.disabled, lg.propagate, lg.handlers = disabled, propagate, handlers
    if columns is None:
        os.environ.pop("COLUMNS", None)
    else:
        os.environ["COLUMNS"] = columns


def shipped() -> OutputState:
    """The driver's state now, as a rank receives it (pickled and loaded)."""
    state = capture()
    loaded = protocol.loads(protocol.dumps(state))
    assert isinstance(loaded, OutputState)
    return loaded


def test_capture_sends_the_filters_that_pickle_with_their_regexes(rank_state: None) -> None:
    # Made here, so cloudpickle sends it by value, with its class dict: the lock does not pickle.
    unpicklable = type("Unpicklable", (UserWarning,), {"lock": threading.Lock()})
    warnings.filterwarnings("ignore", message=r"noisy \d+ times", category=UserWarning, module=r"mymod\.")
    warnings.filterwarnings("error", category=unpicklable)  # type: ignore[arg-type]
    warnings.filters.append(warnings.filters[-1])  # a duplicate (a later one never matches)
    state = shipped()
    entries = [protocol.loads(data) for data in state.filters]
    assert entries[0] == ("ignore", r"noisy \d+ times", UserWarning, r"mymod\.", 0)
    assert all(entry[2] is not unpicklable for entry in entries), "an entry that cannot travel stays behind"
    assert len(entries) == len(set(entries)), "duplicates are sent once"


def test_the_rank_takes_the_driver_filters_for_a_call_and_the_next_call_replaces_them(
    rank_state: None, capsys: pytest.CaptureFixture[str]
) -> None:
    warnings.filterwarnings("ignore", message="driver filter")
    with_filter = shipped()
    warnings.resetwarnings()
    warnings.simplefilter("default")
    without = shipped()
    warnings.resetwarnings()
    warnings.simplefilter("error")  # the rank's own filters: what the driver sends replaces them

    def call(state: OutputState) -> str:
        with applied(state):
            warnings.warn("driver filter", UserWarning, stacklevel=1)
        return capsys.readouterr().err

    assert call(with_filter) == ""
    shown = call(without)  # the first call's filter does not leak into this one
    assert shown.startswith("\x1eW") and "driver filter" in shown, "a warning is a warning record"
    assert call(without) == "", "same filters, same registry: shown once, as in one process"


def test_the_rank_takes_the_driver_loggers_for_a_call_and_gets_its_own_back(
    rank_state: None, capsys: pytest.CaptureFixture[str]
) -> None:
    lightning_logger = logging.getLogger("lightning.pytorch")
    configured = logging.getLogger("lightdist.test.configured")
    lightning_logger.setLevel(logging.ERROR)
    configured.setLevel(logging.DEBUG)
    configured.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("custom %(levelname)s %(message)s"))
    configured.addHandler(handler)
    state = shipped()
    lightning_logger.setLevel(logging.INFO)
    state_info = shipped()  # the same driver, Lightning's level back at INFO
    # The rank's own state, different from the driver's.
    configured.setLevel(logging.WARNING)
    configured.propagate = True
    configured.handlers.clear()
    own_handlers = list(lightning_logger.handlers)
    stdout, stderr = sys.stdout, sys.stderr
    with applied(state):
        assert isinstance(sys.stdout, RankStream) and isinstance(sys.stderr, RankStream)
        logging.getLogger("lightning.pytorch.core").info("an INFO line of Lightning")  # the driver set ERROR
        configured.debug("debug on")
        assert lightning_logger.level == logging.ERROR and configured.propagate is False
    out = capsys.readouterr()
    assert "an INFO line of Lightning" not in out.err + out.out
    assert out.out == "custom DEBUG debug on\n", "the driver's console handler, format and level"
    assert (sys.stdout, sys.stderr) == (stdout, stderr)
    assert lightning_logger.level == logging.INFO and lightning_logger.handlers == own_handlers
    assert (configured.level, configured.propagate, configured.handlers) == (logging.WARNING, True, [])
    with applied(state_info):  # the line was missing for the level, not for want of a way out
        logging.getLogger("lightning.pytorch.core").info("an INFO line of Lightning")
    assert "an INFO line of Lightning" in capsys.readouterr().err


def test_the_rank_writes_for_the_driver_terminal(rank_state: None) -> None:
    os.environ.pop("COLUMNS", None)
    state = OutputState(filters=(), loggers=(), disable=logging.NOTSET, isatty=(True, False), columns=132)
    with applied(state):
        assert sys.stdout.isatty() is True and sys.stderr.isatty() is False
        assert os.environ["COLUMNS"] == "132"
    assert "COLUMNS" not in os.environ


def test_rank_output_is_written_while_a_tqdm_bar_is_being_built() -> None:
    # tqdm registers a bar in __new__, before __init__ sets `disable`; the output thread met one
    # there in the README's quick start and died (AttributeError), losing every later rank line.
    import io

    import tqdm

    from lightdist._progress import write_around_bars

    half_built = tqdm.tqdm.__new__(tqdm.tqdm)
    try:
        stream = io.StringIO()
        write_around_bars(stream, "[rank 0] hello\n")
        assert stream.getvalue() == "[rank 0] hello\n"
    finally:
        tqdm.tqdm._instances.discard(half_built)
