"""TensorBoard's HParams tab for ``lightdist sweep``: every combination's values and final metrics.

TensorBoard's hparams plugin reads three kinds of summary (``tensorboard.plugins.hparams``):

- per run, i.e. per combination (the directory where rank 0's ``TensorBoardLogger`` wrote its
  curves): a *session start* with the combination's values and a *session end* with its status;
- the metrics: the last value of a scalar tag in that run. The sweep writes each final metric
  (``trainer.callback_metrics``, what its table prints) once, as ``final/<name>`` at the fit's last
  step. A tag of its own, not rank 0's ``val_acc``: the table then shows exactly the sweep's
  figure (rank 0 may log ``train_loss`` only every N steps), and the reader's "last value" cannot
  depend on the order in which it reads the two processes' event files;
- an *experiment* (the table's columns: each grid key with its values, each metric), written once
  to the sweep directory itself when the sweep ends, as TensorBoard's docs place it. While a sweep
  runs there is none yet and TensorBoard infers the columns from the sessions it finds, so
  finished combinations show as they finish.

Grid values are typed as TensorBoard compares them: all numbers, or all booleans, else strings.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["FINAL", "typed_values", "write_experiment", "write_session"]

FINAL = "final/"  # the scalar tags of the final metrics: final/val_acc, ...

HParamValue = float | bool | str


def typed_values(values: Sequence[str]) -> list[HParamValue]:
    """``["1e-3", "3e-3"]`` → ``[0.001, 0.003]``; ``["true", "false"]`` → booleans; mixed → as given."""
    if all(value.lower() in ("true", "false") for value in values):
        return [value.lower() == "true" for value in values]
    try:
        return [float(value) for value in values]
    except ValueError:
        return list(values)


def write_session(
    run_dir: Path,
    hparams: Mapping[str, HParamValue],
    metrics: Mapping[str, float],
    *,
    step: int,
    started: float,
    status: str,
) -> None:
    """Record one combination in its run directory: values, final metrics, and ``status``
    (``"success"``, ``"failure"`` or ``"unknown"`` for an interrupted fit)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2
    from tensorboard.plugins.scalar.summary_v2 import scalar_pb

    statuses = {"success": api_pb2.STATUS_SUCCESS, "failure": api_pb2.STATUS_FAILURE, "unknown": api_pb2.STATUS_UNKNOWN}
    # trial_id: the run's name groups nothing with another run (the default is a hash of the values)
    summaries = [summary_v2.hparams_pb(dict(hparams), trial_id=run_dir.name, start_time_secs=started)]
    summaries += [scalar_pb(FINAL + name, value) for name, value in sorted(metrics.items())]
    end = plugin_data_pb2.SessionEndInfo(status=statuses[status], end_time_secs=time.time())
    summaries.append(
        summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(
                    tag=metadata.SESSION_END_INFO_TAG,
                    metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_end_info=end)),
                    tensor=metadata.NULL_TENSOR,
                )
            ]
        )
    )
    _write(run_dir, summaries, step)


def write_experiment(sweep_dir: Path, grid: Mapping[str, Sequence[HParamValue]], metric_names: Sequence[str]) -> None:
    """The HParams table's columns: each grid key with its possible values, then each metric."""
    from tensorboard.plugins.hparams import summary_v2

    hparams = [summary_v2.HParam(key, summary_v2.Discrete(list(values))) for key, values in grid.items()]
    metrics = [summary_v2.Metric(FINAL + name, display_name=name) for name in sorted(metric_names)]
    _write(sweep_dir, [summary_v2.hparams_config_pb(hparams, metrics)], 0)


def _write(log_dir: Path, summaries: Sequence[object], step: int) -> None:
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    # A new event file beside rank 0's (TensorBoard reads every event file of a run directory).
    writer = EventFileWriter(str(log_dir))
    try:
        for summary in summaries:
            writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    finally:
        writer.close()  # flushes, and ends the writer's thread
