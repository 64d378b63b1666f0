"""The ``lightdist`` command.

::

    lightdist fit --config digits/pretrain-cpu                     # LightningCLI, on the warm pool
    lightdist validate | test | predict --config ... --ckpt_path ...
    lightdist fit --config ... --server [URL]                      # as a job on a lightdist server
    lightdist jobs [ID]                                            # that server's jobs
    lightdist sweep --config X --grid model.lr=1e-3,1e-4            # every combination, one pool
    lightdist serve --devices 2                                    # a warm pool behind a job API
    lightdist recipes                                              # recipes and configs on disk
    lightdist cp digits/pretrain-cpu my.yaml                       # copy a shipped config to edit
    lightdist tensorboard --logdir runs                            # serve the run directory
    lightdist agent --connect tcp://DRIVER:PORT --key-file F       # attach this host to a pool
    lightdist keys create DIR                                      # key files for a pool across hosts

``fit / validate / test / predict`` are LightningCLI subcommands (``--config``, dotted overrides
such as ``--trainer.max_epochs=3``, ``--print_config``) whose Trainer defaults to
``strategy="lightdist"``. Each subcommand module is imported only when it runs, so ``lightdist
recipes`` and ``lightdist cp`` answer without importing torch; nor does a trainer command with ``--server`` (the thin
client, ``_remote``) or ``lightdist jobs``.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]

_USAGE = """\
usage: lightdist {fit,validate,test,predict,jobs,sweep,serve,recipes,cp,tensorboard,agent,worker,keys} ...

  fit, validate, test, predict   run a LightningCLI config on a warm pool of ranks
                                 (lightdist fit --config digits/pretrain-cpu);
                                 with --server [URL]: as a job on a lightdist server
  jobs                           list a server's jobs, or show, follow or cancel one
  sweep                          run every combination of --grid overrides on one pool
  serve                          keep a warm pool up and run jobs on it (docs/server.md)
  recipes                        list the recipes and the configs shipped with them
  cp                             copy a shipped config out to edit (lightdist cp digits/pretrain-cpu my.yaml)
  tensorboard (or view)          serve a run directory with TensorBoard
  agent                          attach this host's ranks to a driver's pool (one per host)
  worker                         attach this process as one rank (for torchrun)
  keys                           create key files for a pool across hosts

'lightdist <command> --help' describes each command.
"""

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
_REMOTE_FLAGS = ("--server", "--name", "--detach", "--restarts")  # the thin client's (cli/_remote.py)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightdist`` console script; returns the exit status."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `lightdist recipes | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141


def _main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(_USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in TRAINER_COMMANDS and any(arg.partition("=")[0] in _REMOTE_FLAGS for arg in rest):
        return _remote(command, rest)
    if command in (*TRAINER_COMMANDS, "sweep"):
        _import_from_cwd()
    if command in TRAINER_COMMANDS:
        problem = _ckpt_path_problem(rest)
        if problem is not None:
            print(f"lightdist {command}: error: {problem} (see: lightdist {command} --help)", file=sys.stderr)
            return 2
        from lightdist.cli._lightning import run_trainer_command

        return run_trainer_command(command, rest)
    if command == "jobs":
        from lightdist.cli._jobs import main as jobs_main

        return jobs_main(rest)
    if command == "sweep":
        from lightdist.cli._sweep import main as sweep_main

        return sweep_main(rest)
    if command == "recipes":
        from lightdist.cli._catalog import main as recipes_main

        return recipes_main(rest)
    if command == "cp":
        from lightdist.cli._copy import main as copy_main

        return copy_main(rest)
    if command in ("tensorboard", "view"):
        from lightdist.cli._tensorboard import main as tensorboard_main

        return tensorboard_main(rest)
    if command == "agent":
        from lightdist.agent import main as agent_main

        return agent_main(rest)
    if command == "worker":
        from lightdist._torchrun import worker_main

        return worker_main(rest)
    if command == "keys":
        return _keys(rest)
    if command == "serve":
        from lightdist.server._serve import main as serve_main

        return serve_main(rest)
    print(f"lightdist: error: unknown command {command!r}\n\n{_USAGE}", end="", file=sys.stderr)
    return 2


def _import_from_cwd() -> None:
    """Let ``--model mymod.Reg`` find ``./mymod.py``, as ``python -m lightdist.cli`` does.

    ``python -m`` puts the working directory first on ``sys.path``; the console script puts its own
    ``bin`` directory there instead. The ranks get the driver's ``sys.path`` with every call, so they
    find the module too.
    """
    cwd = os.getcwd()
    if not any(os.path.abspath(entry or ".") == cwd for entry in sys.path):
        sys.path.insert(0, cwd)


def _remote(command: str, args: list[str]) -> int:
    """``lightdist COMMAND ... --server [URL]``: the job runs on the server; this process stays light."""
    from lightdist.cli._remote import RemoteArgsError, run_remote, runs_here, split_remote_args

    try:
        options, rest = split_remote_args(args)
    except RemoteArgsError as error:
        print(f"lightdist {command}: error: {error} (see: lightdist {command} --help)", file=sys.stderr)
        return 2
    if runs_here(rest):  # --help, --print_config: the parser answers, here
        return _main([command, *rest])
    return run_remote(command, options, rest)


def _ckpt_path_problem(args: list[str]) -> str | None:
    """A bad ``--ckpt_path`` on the command line, found before Lightning is imported (seconds
    earlier); one set in a config file is checked once the config is parsed."""
    from lightdist.cli._checkpoint import check_ckpt_path, ckpt_path_arg
    from lightdist.errors import ConfigError

    value = ckpt_path_arg(args)
    if value is None:
        return None
    try:
        check_ckpt_path(value)
    except ConfigError as error:
        return str(error)
    return None


def _keys(argv: list[str]) -> int:
    import argparse

    from lightdist.keys import KeyFileError, add_client, create_pool_keys

    parser = argparse.ArgumentParser(prog="lightdist keys", description="Key files for a pool across hosts.")
    commands = parser.add_subparsers(dest="action", required=True)
    create = commands.add_parser("create", help="a driver file and a client file (mode 0600) in DIR")
    create.add_argument("directory")
    create.add_argument(
        "--force",
        "--overwrite",
        action="store_true",
        help="replace the pool's key files in DIR (agents holding the old client file can no longer attach)",
    )
    add = commands.add_parser("add-client", help="a new client file, allowed by the driver file")
    add.add_argument("driver_file")
    add.add_argument("client_file")
    args = parser.parse_args(argv)
    try:
        if args.action == "create":
            driver, client = create_pool_keys(args.directory, overwrite=args.force)
            print(f"driver key file: {driver}  (keep it on the driver's host)")
            print(f"client key file: {client}  (copy it to every agent host, mode 0600)")
        else:
            print(f"client key file: {add_client(args.driver_file, args.client_file)}")
    except KeyFileError as error:
        print(f"lightdist keys: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # python -m lightdist.cli
    sys.exit(main())
