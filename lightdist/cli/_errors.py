"""How the CLI reports an error: one function decides the exit status and the line to show.

Exit statuses: 2 for bad input (a command line or config the user can fix, whether the parser, a
class's ``__init__`` or a check on the ranks found it), 1 when a rank failed or died, 130 for Ctrl-C
(told by the trainer, not by an exception). Anything else is a bug and keeps its traceback.
Only light modules are imported at the top: ``lightdist --help`` must not pay for jsonargparse.
"""

from __future__ import annotations

import re
import sys

from lightdist.errors import ConfigError, WorkerDiedError, WorkerError

__all__ = ["BAD_INPUT", "RANK_FAILED", "INTERRUPTED", "classify", "explain", "one_line"]

BAD_INPUT = 2
RANK_FAILED = 1
INTERRUPTED = 130


def classify(error: BaseException) -> tuple[int, str] | None:
    """``(exit status, one-line message)`` for an error the CLI reports, or None for a bug.

    For a failed rank the line is the error's first one; a caller with room shows ``str(error)``
    too, which adds the rank's traceback.
    """
    from jsonargparse import ArgumentError  # lazily: imported here only once an error happened

    if isinstance(error, ArgumentError) or config_error_in(error) is not None:
        return BAD_INPUT, explain(error)
    if isinstance(error, WorkerError) and _is_config_error(error.exc_type):  # a check that needs the ranks
        return BAD_INPUT, one_line(Exception(error.message))
    if isinstance(error, (WorkerError, WorkerDiedError)):
        return RANK_FAILED, str(error).splitlines()[0]
    return None


def _is_config_error(qualified_name: str) -> bool:
    """Whether a rank's exception class, known by name, is a ``ConfigError`` (a recipe may subclass it).

    The class is looked up among the modules already loaded here, never imported: the driver has
    loaded the recipe's module (it parsed the config), so its classes compare as real classes.
    """
    parts = qualified_name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        found: object = sys.modules.get(".".join(parts[:split]))
        if found is None:
            continue
        for name in parts[split:]:
            found = getattr(found, name, None)
        return isinstance(found, type) and issubclass(found, ConfigError)
    return False


def config_error_in(error: BaseException) -> ConfigError | None:
    """The recipe's ``ConfigError`` in ``error``'s chain (jsonargparse wraps what ``__init__`` raises)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ConfigError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def one_line(error: BaseException) -> str:
    """An error message on one line (jsonargparse's span several, indented)."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def explain(error: BaseException) -> str:
    """The line to show for a bad command line or config.

    A recipe's own ``ConfigError`` wins wherever it sits in the exception chain (jsonargparse wraps
    errors raised by a class's ``__init__``). For a ``class_path`` group jsonargparse reports every
    member of the ``Union[Module, None]`` it tried; only the class's own complaint is kept, with its
    key made whole: ``model.lr: Expected a <class 'float'>. Got value: abc``.
    """
    config_error = config_error_in(error)
    if config_error is not None:
        return one_line(config_error)
    text = str(error)
    missing = re.match(r"""Parser key "config":\s*File does not exist: '([^']*)'""", text)
    if missing is not None:  # neither a file nor a shipped config (cli/_catalog.py looked for both)
        return (
            f"--config {missing.group(1)}: no such file, and no shipped config of that name "
            "(lightdist recipes lists them)"
        )
    group = re.match(r'Parser key "([^"]+)":', text)
    problem = re.search(
        r"Problem with given class_path '([^']+)':\s*(.*?)(?:\n\s*- Expected a <class 'NoneType'>|$)", text, re.S
    )
    if group is None or problem is None:
        return one_line(error)
    class_path, detail = problem.group(1), one_line(Exception(problem.group(2)))
    inner = re.match(r'Parser key "([^"]+)":\s*(.*)', detail)
    if inner is not None:
        return f"{group.group(1)}.{inner.group(1)}: {inner.group(2)}"
    unknown = re.match(r"Option '([^']+)' is not accepted", detail)
    if unknown is not None:
        return f"{group.group(1)}.{unknown.group(1)}: no such argument of {class_path}"
    return f"{group.group(1)} ({class_path}): {detail}"
