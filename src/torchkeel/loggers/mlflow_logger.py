"""MLflow: a sink writing to an MLflow run, and ``MLflowLogger``, the callback that drives it.

mlflow loads only when a fit opens the sink (rank 0); constructing one only checks it is there.

The run continues across a resume: its id is saved in every checkpoint (``LoggerCallback``'s state),
so ``fit(resume_from=...)``, in a new process too (kill -9, SIGTERM, a torchrun restart), logs into the
same run. MLflow cannot delete a metric's points (mlflow#2973), so a resumed fit cannot drop what the
interrupted one wrote past its checkpoint: it writes each series only from the first step past what the
run already holds. Every series keeps unique, increasing steps; on the CPU, where torchkeel resumes bit
for bit, the points kept are the ones the resumed fit computes again.

Example:
    >>> AdvancedTrainer(..., callbacks=[MLflowLogger(experiment_name="mnist")])
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torchkeel.callbacks.base import check_every
from torchkeel.loggers.base import (
    FitStart,
    HParam,
    LoggerCallback,
    ValidationKind,
    step_series,
    validation_series,
)

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

__all__ = ["MLFLOW_MISSING", "MLflowLogger", "MLflowSink"]

log = logging.getLogger("torchkeel")

MLFLOW_MISSING = "MLflow logging needs mlflow: pip install 'torchkeel[mlflow]'."
MAX_PARAM = 6000     # MLflow's longest param value (characters)


def _check_args(owner: str, tracking_uri: object, experiment_name: object, run_name: object) -> None:
    if tracking_uri is not None and not isinstance(tracking_uri, (str, os.PathLike)):
        raise TypeError(f"{owner}(tracking_uri={tracking_uri!r}): expected a URI string such as "
                        "'sqlite:///mlflow.db' or 'http://127.0.0.1:5000', or None for MLflow's own default.")
    if not isinstance(experiment_name, str) or not experiment_name:
        raise ValueError(f"{owner}(experiment_name={experiment_name!r}): expected a non-empty str, e.g. 'mnist'.")
    if run_name is not None and not isinstance(run_name, str):
        raise TypeError(f"{owner}(run_name={run_name!r}): expected a str or None (MLflow names the run).")


def _check_installed() -> None:
    if importlib.util.find_spec("mlflow") is None:
        raise ImportError(MLFLOW_MISSING)   # at construction, before training; imports nothing


class MLflowSink:
    """Write to one MLflow run: the series TensorBoard has, under the same names, and the hparams as params.

    Step values go to ``train/<name>`` (``train_loss`` as ``train/loss``), validation values to
    ``epoch/<name>``, both at the optimizer step; ``trainer.hparams`` and the model's totals
    (``model/params``, ``model/trainable_params``, ``model/bytes``) become params when the fit opens the run; the last and best checkpoint paths are the tags ``checkpoint/last`` and ``checkpoint/best``;
    the run ends ``FINISHED`` when the fit does, ``FAILED`` when it raises, ``KILLED`` when interrupted.

    Args:
        tracking_uri: where the runs are kept: a folder or ``sqlite:///`` file, or a tracking server's
            ``http://`` URI. ``None``: ``MLFLOW_TRACKING_URI``, else MLflow's own default.
        experiment_name: the experiment, created when missing.
        run_name: the run's name; ``None``: MLflow picks one.

    Example:
        >>> LoggerCallback(MLflowSink("sqlite:///runs/mlflow.db", "mnist"))
    """

    def __init__(self, tracking_uri: str | os.PathLike[str] | None = None, experiment_name: str = "torchkeel",
                 run_name: str | None = None) -> None:
        _check_args(type(self).__name__, tracking_uri, experiment_name, run_name)
        _check_installed()
        self.tracking_uri = os.fspath(tracking_uri) if tracking_uri is not None else None
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.run_id: str | None = None      # the run this sink writes to; from a checkpoint on a resume
        self.client: Any = None             # the MlflowClient while a fit is open
        self._held: dict[str, int] = {}     # per series: the last step the run held when this fit opened it
        self._status = "FINISHED"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tracking_uri={self.tracking_uri!r}, experiment_name={self.experiment_name!r})"

    def state_dict(self) -> dict[str, Any]:
        """The run's id and store: what a resumed fit needs to log into the same run."""
        if self.run_id is None:
            return {}
        return {"run_id": self.run_id, "tracking_uri": self.client_uri, "experiment_name": self.experiment_name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the run of a checkpoint's fit back: the next ``open`` continues it."""
        run_id = state.get("run_id")
        if isinstance(run_id, str) and run_id:
            self.run_id = run_id
            self._saved_uri = state.get("tracking_uri")

    @property
    def client_uri(self) -> str | None:
        """The tracking URI in use (after ``open``), else the one given."""
        return str(self.client.tracking_uri) if self.client is not None else self.tracking_uri

    def open(self, start: FitStart) -> None:
        """Start a run, or continue the one a checkpoint named; log the params; read what the run holds.

        Args:
            start: where the fit starts, and the hparams.
        """
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ImportError(MLFLOW_MISSING) from exc
        client = MlflowClient(tracking_uri=self.tracking_uri)
        self._held = {}
        if self.run_id is not None:
            self._continue(client, start)
        else:
            found = client.get_experiment_by_name(self.experiment_name)
            experiment = found.experiment_id if found is not None else client.create_experiment(self.experiment_name)
            self.run_id = client.create_run(experiment, run_name=self.run_name).info.run_id
            log.info("MLflowLogger: run %s in experiment %r at %s.", self.run_id, self.experiment_name,
                     client.tracking_uri)
        self.client, self._status = client, "FINISHED"
        self._log_params({**start.hparams, **start.model})

    def _continue(self, client: Any, start: FitStart) -> None:
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(self.run_id)
        except MlflowException as exc:
            raise RuntimeError(
                f"MLflowLogger: the checkpoint names MLflow run {self.run_id}, which {client.tracking_uri} does not "
                f"hold ({exc}). Resume with the tracking_uri the run was written to (the checkpoint's fit used "
                f"{getattr(self, '_saved_uri', None)!r}).") from exc
        if run.info.status != "RUNNING":
            client.update_run(self.run_id, status="RUNNING")
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(self.run_id, key)]
            if steps:
                self._held[key] = max(steps)
        past = max(self._held.values(), default=-1)
        if past > start.step:
            log.info("MLflowLogger: continuing run %s from step %d; it holds points up to step %d from the interrupted "
                     "fit, which MLflow cannot delete: they stay, and each series goes on past them.",
                     self.run_id, start.step, past)
        else:
            log.info("MLflowLogger: continuing run %s from step %d.", self.run_id, start.step)

    def _log_params(self, hparams: Mapping[str, HParam]) -> None:
        """Log the params the run does not have; a changed value is kept as it was (MLflow params are fixed)."""
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        new = {k: str(v)[:MAX_PARAM] for k, v in hparams.items()}
        changed = sorted(k for k, v in new.items() if k in have and have[k] != v)
        if changed:
            log.warning("MLflowLogger: run %s keeps its params %s as first logged (MLflow cannot change a param); "
                        "this fit has %s.", self.run_id, {k: have[k] for k in changed}, {k: new[k] for k in changed})
        params = [Param(k, v) for k, v in new.items() if k not in have]
        if params:
            self.client.log_batch(self.run_id, params=params)

    def _log(self, step: int, named: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now, held = int(time.time() * 1000), self._held
        metrics = [Metric(key, float(value), now, step) for key, value in named.items() if step > held.get(key, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def write_step(self, step: int, epoch: int, values: Mapping[str, float]) -> None:
        """Log ``train/<name>`` metrics at ``step``.

        Args:
            step: optimizer steps so far.
            epoch: the 0-based epoch (not written).
            values: the step's values.
        """
        self._log(step, step_series(values))

    def write_validation(self, step: int, epoch: int, kind: ValidationKind, values: Mapping[str, float]) -> None:
        """Log ``epoch/<name>`` metrics at ``step``.

        Args:
            step: optimizer steps so far.
            epoch: the 0-based epoch (not written).
            kind: epoch end or mid-epoch (not written).
            values: the validation point's values.
        """
        self._log(step, validation_series(values))

    def write_hparams(self, hparams: Mapping[str, HParam], metrics: Mapping[str, float], step: int) -> None:
        """Log params the run does not have yet (they were logged at ``open``); the metrics are in the series.

        Args:
            hparams: plain hyperparameter values.
            metrics: the final metrics (already logged as ``epoch/<name>``).
            step: optimizer steps at the end.
        """
        self._log_params(hparams)

    def write_checkpoint(self, step: int, paths: Mapping[str, str]) -> None:
        """Set the tags ``checkpoint/last`` and ``checkpoint/best`` to the paths.

        Args:
            step: optimizer steps so far.
            paths: ``last`` and, when there is one, ``best``.
        """
        for key, path in paths.items():
            self.client.set_tag(self.run_id, f"checkpoint/{key}", path)

    def end(self, status: str) -> None:
        """How the run ends when the sink closes: ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self._status = status

    def close(self) -> None:
        """End the run with its status."""
        client, self.client = self.client, None
        if client is not None and self.run_id is not None:
            client.set_terminated(self.run_id, status=self._status)


class MLflowLogger(LoggerCallback):
    """Log to MLflow what ``TensorBoardLogger`` writes, under the same names, into one run. Rank 0 only.

    Every ``log_every_n_steps`` optimizer steps ``train/loss``, ``train/lr`` (other groups ``train/lr/...``),
    ``train/<name>`` for each ``trainer.log`` step value and (when clipping) ``train/grad_norm``; at each
    validation point ``epoch/<metric>``; ``trainer.hparams`` as params; the checkpoint paths as the tags
    ``checkpoint/last`` and ``checkpoint/best``. The run's id is saved in every checkpoint: a resumed fit
    continues the run (see the module's doc for what it keeps of the interrupted fit's points).

    Args:
        tracking_uri: a folder, ``sqlite:///file.db`` or ``http://host:port``; ``None``:
            ``MLFLOW_TRACKING_URI``, else MLflow's default (a local store in the working directory).
        experiment_name: the experiment, created when missing.
        run_name: the run's name; ``None``: MLflow picks one.
        log_every_n_steps: default: the trainer's ``log_every_n_steps``.

    Example:
        >>> AdvancedTrainer(..., callbacks=[MLflowLogger("sqlite:///mlflow.db", experiment_name="mnist")])
    """

    def __init__(self, tracking_uri: str | os.PathLike[str] | None = None, experiment_name: str = "torchkeel",
                 run_name: str | None = None, log_every_n_steps: int | None = None) -> None:
        _check_args(type(self).__name__, tracking_uri, experiment_name, run_name)   # errors name this class
        check_every(type(self).__name__, log_every_n_steps)
        self.sink = MLflowSink(tracking_uri, experiment_name, run_name)
        super().__init__(self.sink, log_every_n_steps=log_every_n_steps)

    @property
    def run_id(self) -> str | None:
        """The MLflow run's id once a fit opened it (or a checkpoint named it), else None."""
        return self.sink.run_id

    def on_exception(self, trainer: AdvancedTrainer, exc: BaseException) -> None:
        self.sink.end("KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED")
        super().on_exception(trainer, exc)
