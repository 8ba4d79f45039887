"""Optuna: prune a trial at validation points, in one process or on every rank of a torchrun job at once.

Where others break (optuna#6043, optuna-integration's Lightning callback, transformers#27487): under
DDP only rank 0 holds the trial, so only rank 0 learns that it is pruned; a rank that raises
``TrialPruned`` alone leaves the others waiting in their next collective. Here:

- ``OptunaPruning(trial, monitor)``: at each validation point (``on_validation_end``) rank 0 reports
  the monitored value at the trainer's step and asks ``should_prune()``; a prune is a stop request
  (``trainer.agreement.request_stop``), which the ranks agree on at that same validation point (the
  agreement runs there anyway: no collective of its own), so every rank stops at the same step and
  ``fit`` returns normally on every rank. At ``on_fit_end`` rank 0's verdict is shared (one broadcast
  per fit), and ``check_pruned()``, called after ``fit``, raises ``optuna.TrialPruned`` on every rank,
  as optuna-integration's ``PyTorchLightningPruningCallback.check_pruned`` does. Not raised from inside
  ``fit``: the loggers, the run summary and the checkpoints end a pruned fit as a stopped run, not as a
  failed one. An error of Optuna's on rank 0 (the storage, a multi-objective study) stops training the
  same way and is raised from ``fit`` on every rank (``parallel.collective.raise_together``).
- ``optimize(study, objective, n_trials)``: one process runs ``study.optimize``. In a torchrun job,
  rank 0 runs it and tells the other ranks when each trial starts (one broadcast); every rank runs the
  objective with a ``DistributedTrial``, whose ``suggest_*`` give every rank rank 0's answer; after the
  objective, an error on any rank is raised on every rank, so rank 0's study records it. When rank 0's
  study ends (``n_trials``, ``timeout``, ``study.stop()``, an error), it tells the others, which return
  (or raise the same error). The other ranks never touch the storage. One job, one process group and
  one torch import for the whole study; a study spread over several jobs shares an RDB storage.

Nothing happens per optimizer step: the callback overrides no step hook. Per validation point rank 0
makes Optuna's two storage calls; per fit, two small collectives; per trial, one broadcast to start it,
two per ``suggest_*`` and one exchange at its end.

Not built on optuna-integration's ``TorchDistributedTrial``: it is a separate package; its methods
raise on rank 0 before their broadcast when Optuna fails (the others wait), and the loop that makes
the other ranks follow the study (a fixed ``n_trials`` on each) hangs when rank 0's study ends early.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

try:
    import optuna
except ImportError as exc:
    if exc.name != "optuna":      # optuna is there but one of its own imports failed: say that
        raise
    raise ImportError("torchkeel.integrations.OptunaPruning and optimize need optuna: pip install optuna, or "
                      "pip install 'torchkeel[optuna]'.") from exc

from torchkeel.callbacks.base import Callback
from torchkeel.parallel.collective import raise_together
from torchkeel.parallel.process_group import (
    broadcast_object,
    get_rank,
    get_world_size,
    init_process_group,
    is_distributed,
)

if TYPE_CHECKING:
    from torchkeel.loop import AdvancedTrainer

log = logging.getLogger("torchkeel")

__all__ = ["DistributedTrial", "OptunaPruning", "optimize"]

T = TypeVar("T")
Objective = Callable[["DistributedTrial"], Any]


class DistributedTrial:
    """The trial every rank of a torchrun job sees; rank 0 holds Optuna's (``optimize`` makes them).

    Its methods are called by every rank at the same point, as the objective runs: rank 0 asks Optuna
    and every rank gets rank 0's answer, or raises rank 0's error. In one process it is Optuna's trial,
    with no communication.

    Args:
        trial: Optuna's trial on rank 0 (in one process, the trial); ``None`` on the other ranks.
        number: the trial's number.

    Example:
        >>> def objective(trial):        # trial: a DistributedTrial, the same on every rank
        ...     lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    """

    def __init__(self, trial: optuna.trial.Trial | None, number: int) -> None:
        self.world_size = get_world_size()
        if (trial is None) != (get_rank() != 0):
            raise ValueError(f"DistributedTrial: rank {get_rank()} got trial={trial!r}; rank 0 (or one process) holds "
                             "Optuna's trial and the other ranks None. torchkeel.integrations.optimize makes them.")
        self.trial = trial
        self.number = number
        self._params: dict[str, Any] = {}
        self._user_attrs: dict[str, Any] = {}
        self._pruning: list[OptunaPruning] = []    # this trial's callbacks (_attach): _run checks them after the objective

    def __repr__(self) -> str:
        return f"DistributedTrial(number={self.number}, rank {get_rank()} of {self.world_size})"

    @property
    def params(self) -> dict[str, Any]:
        """The values suggested so far in this trial, by name."""
        return dict(self._params)

    @property
    def user_attrs(self) -> dict[str, Any]:
        """The attributes set with ``set_user_attr`` in this trial."""
        return dict(self._user_attrs)

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        """Optuna's ``Trial.suggest_float``: rank 0's value on every rank."""
        value = self._ask(f"suggest_float({name!r})", lambda t: t.suggest_float(name, low, high, step=step, log=log))
        self._params[name] = value
        return value

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        """Optuna's ``Trial.suggest_int``: rank 0's value on every rank."""
        value = self._ask(f"suggest_int({name!r})", lambda t: t.suggest_int(name, low, high, step=step, log=log))
        self._params[name] = value
        return value

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        """Optuna's ``Trial.suggest_categorical``: rank 0's choice on every rank."""
        value = self._ask(f"suggest_categorical({name!r})", lambda t: t.suggest_categorical(name, choices))
        self._params[name] = value
        return value

    def set_user_attr(self, key: str, value: Any) -> None:
        """Optuna's ``Trial.set_user_attr`` (rank 0 writes it)."""
        self._ask(f"set_user_attr({key!r})", lambda t: t.set_user_attr(key, value))
        self._user_attrs[key] = value

    def report(self, value: float, step: int) -> None:
        """Optuna's ``Trial.report`` (rank 0 reports). ``OptunaPruning`` reports for a trainer with no collective."""
        self._ask(f"report(step={step})", lambda t: t.report(value, step))

    def should_prune(self) -> bool:
        """Optuna's ``Trial.should_prune``: rank 0's verdict on every rank."""
        return bool(self._ask("should_prune()", lambda t: bool(t.should_prune())))

    def _attach(self, pruning: OptunaPruning) -> None:
        """An ``OptunaPruning`` made for this trial: ``optimize`` checks, after the objective, that a prune was raised."""
        self._pruning.append(pruning)

    def _unchecked(self) -> list[OptunaPruning]:
        """This trial's callbacks that pruned it while the objective returned without ``check_pruned()``."""
        return [p for p in self._pruning if p.pruned is not None and not p.checked]

    def _ask(self, where: str, ask: Callable[[optuna.trial.Trial], T]) -> T:
        """Rank 0 asks Optuna; every rank returns its answer, or raises its error."""
        if self.world_size == 1:
            assert self.trial is not None    # one process holds the trial (checked in __init__)
            return ask(self.trial)
        if not is_distributed():
            raise RuntimeError(f"trial {self.number}: {where}: the process group is gone (closed inside the objective, "
                               "e.g. by leaving a `with DistributedTrainer(...)` block); use the trial before closing it.")
        answer: T | None = None
        error: Exception | None = None
        if self.trial is not None:
            try:
                answer = ask(self.trial)
            except Exception as exc:  # noqa: BLE001 - raised on every rank just below
                error = exc
        raise_together(error, f"trial {self.number}: {where}")
        return broadcast_object(answer)     # type: ignore[no-any-return]


class OptunaPruning(Callback):
    """Prune an Optuna trial at validation points; under DDP every rank stops at the same step.

    At each validation point rank 0 reports ``trainer.state.metrics[monitor]`` to the trial at the
    trainer's step (optimizer steps) and asks ``should_prune()``. A prune stops training at that point
    on every rank (the ranks' agreement, see ``torchkeel.agreement``) and ``fit`` returns normally;
    then ``check_pruned()`` raises ``optuna.TrialPruned`` on every rank, for Optuna to record the trial
    as pruned: call it right after ``fit`` (``optimize`` calls it for an objective that forgot, with a
    warning). An error of Optuna's (its storage, a multi-objective study) stops training the same way
    and is raised from ``fit`` on every rank.

    Args:
        trial: the trial the objective received: a ``DistributedTrial`` from
            ``torchkeel.integrations.optimize`` (one process or torchrun), or, in one process, an
            ``optuna.trial.Trial`` (``FixedTrial`` and ``FrozenTrial`` never prune).
        monitor: the metric to report, a name in ``trainer.state.metrics`` (``'val_loss'``, ``'val_acc'``...);
            the study's direction says whether lower or higher is better.

    Example:
        >>> pruning = OptunaPruning(trial, monitor="val_loss")
        >>> trainer = AdvancedTrainer(model, optimizer, criterion, callbacks=[pruning])
        >>> trainer.fit(train_loader, val_loader, epochs=5, val_every_n_steps=50)
        >>> pruning.check_pruned()          # raises optuna.TrialPruned (on every rank) when pruned
    """

    def __init__(self, trial: DistributedTrial | optuna.trial.BaseTrial, monitor: str = "val_loss") -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"OptunaPruning: monitor={monitor!r} must be a metric name such as 'val_loss'.")
        if not isinstance(trial, (DistributedTrial, optuna.trial.BaseTrial)):
            raise TypeError(f"OptunaPruning: trial={trial!r} is a {type(trial).__name__}; pass the trial your objective "
                            "received: the DistributedTrial that torchkeel.integrations.optimize passes, or an "
                            "optuna.trial.Trial (one process).")
        self.trial = trial
        self.monitor = monitor
        self.ranks = trial.world_size if isinstance(trial, DistributedTrial) else 1   # processes sharing the trial
        # where Optuna is asked: rank 0's trial (None on the other ranks)
        self._optuna = trial.trial if isinstance(trial, DistributedTrial) else trial
        self.pruned: str | None = None    # why, once pruned (every rank knows after fit)
        self.checked = False              # check_pruned() was called
        self._error: Exception | None = None
        if isinstance(trial, DistributedTrial):
            trial._attach(self)

    @property
    def state_key(self) -> str:
        return f"OptunaPruning[{self.monitor}]"

    @property
    def number(self) -> int | None:
        """The trial's number."""
        return getattr(self.trial, "number", None)

    def on_fit_begin(self, trainer: AdvancedTrainer) -> None:
        # the same facts on every rank, so every rank raises here alike, before training
        world = trainer.world_size
        if isinstance(self.trial, DistributedTrial) and world != self.ranks:
            raise ValueError(f"OptunaPruning: trial {self.number} is shared by {self.ranks} rank(s), but this trainer "
                             f"runs on {world}; wrap the model with DistributedTrainer so that every rank trains it.")
        if isinstance(self.trial, optuna.trial.Trial) and world > 1:
            raise ValueError(
                f"OptunaPruning: this fit runs on {world} ranks, but an optuna.trial.Trial lives on one rank only "
                "(asked on every rank, each would hold other hyperparameters). Run the study with "
                "torchkeel.integrations.optimize(study, objective, ...): its objective receives a DistributedTrial "
                "that every rank shares.")

    def on_validation_end(self, trainer: AdvancedTrainer) -> None:
        metrics = trainer.state.metrics
        if self.monitor not in metrics:     # every rank holds the same metrics: every rank raises
            raise ValueError(f"OptunaPruning: monitor={self.monitor!r} is not in this validation's metrics "
                             f"({', '.join(map(repr, sorted(metrics)))}). Pass one of those.")
        if self._optuna is None or self.pruned is not None or self._error is not None:
            return                          # not rank 0, or decided already
        value, step = float(metrics[self.monitor]), trainer.state.step
        try:
            self._optuna.report(value, step)
            prune = bool(self._optuna.should_prune())
        except Exception as exc:  # noqa: BLE001 - raised from fit on every rank (on_fit_end)
            self._error = exc
            trainer.agreement.request_stop(f"OptunaPruning: trial {self.number}: Optuna failed at step {step}: {exc}")
            log.warning("OptunaPruning: reporting %s=%.6g at step %d to trial %s failed (%s: %s); training stops "
                        "here and fit raises it.", self.monitor, value, step, self.number, type(exc).__name__, exc)
            return
        if prune:
            self.pruned = f"Trial {self.number} pruned at step {step} ({self.monitor}={value:.6g})."
            trainer.agreement.request_stop(f"Optuna: {self.pruned}")
            log.info("OptunaPruning: %s Training stops at this validation point%s; call check_pruned() after fit.",
                     self.pruned, " on every rank" if trainer.world_size > 1 else "")

    def on_fit_end(self, trainer: AdvancedTrainer) -> None:
        """Every rank learns rank 0's verdict (under DDP: two small collectives, once per fit)."""
        error, self._error = self._error, None
        if trainer.world_size > 1:
            raise_together(error, f"OptunaPruning (trial {self.number})")    # rank 0's error, on every rank
            self.pruned = broadcast_object(self.pruned)
        elif error is not None:
            raise error

    def check_pruned(self) -> None:
        """Raise ``optuna.TrialPruned`` when the trial was pruned; call it after ``fit`` (on every rank).

        Raises:
            optuna.TrialPruned: the trial was pruned during ``fit`` (every rank raises it).
        """
        self.checked = True
        if self.pruned is not None:
            raise optuna.TrialPruned(self.pruned)


def optimize(study: optuna.Study | Callable[[], optuna.Study], objective: Objective, n_trials: int | None = None, *,
             timeout: float | None = None, backend: str | None = None, **kwargs: Any) -> optuna.Study | None:
    """Run an Optuna study whose objective trains in one process, or on every rank of a torchrun job.

    The same script runs both ways. In one process this is ``study.optimize``. Under torchrun rank 0 runs
    the study and the other ranks follow it trial by trial: every rank calls ``objective`` with a
    ``DistributedTrial`` that gives every rank rank 0's suggestions; an error on any rank fails the
    trial on every rank; ``optuna.TrialPruned`` (``OptunaPruning.check_pruned``) prunes it. When the
    study ends (``n_trials``, ``timeout``, ``study.stop()``, an error), every rank returns (or raises).

    The process group: joined here (``init_process_group``) before the first trial and kept across
    trials; an objective may still close it (``with DistributedTrainer(...)``): it is joined again for
    the next trial. It is freed at exit, or by ``DistributedTrainer.close()`` / ``shutdown()``.

    Args:
        study: an ``optuna.Study``, or a function of no arguments that makes one; under torchrun the
            function runs on rank 0 only (only rank 0 touches the storage: the ranks do not race to
            create the same study) and a study given is used by rank 0 only.
        objective: ``objective(trial) -> value``, called with a ``DistributedTrial``.
        n_trials: as ``Study.optimize``.
        timeout: as ``Study.optimize``.
        **kwargs: as ``Study.optimize`` (``catch``, ``callbacks``, ``gc_after_trial``,
            ``show_progress_bar``); ``n_jobs`` must be 1: every rank trains each trial.
        backend: the process group's backend under torchrun (default nccl with CUDA, else gloo).

    Returns:
        The study on rank 0 (and in one process); ``None`` on the other ranks.

    Example:
        >>> study = optimize(lambda: optuna.create_study(storage="sqlite:///hpo.db"), objective, n_trials=20)
    """
    if not callable(objective):
        raise TypeError(f"optimize: objective={objective!r} is not callable; pass objective(trial) -> value.")
    if not isinstance(study, optuna.Study) and not callable(study):
        raise TypeError(f"optimize: study={study!r} is a {type(study).__name__}; pass an optuna.Study, or a "
                        "function of no arguments that makes one (under torchrun rank 0 calls it).")
    n_jobs = kwargs.pop("n_jobs", 1)
    if n_jobs != 1:
        raise ValueError(f"optimize(n_jobs={n_jobs!r}): every rank trains each trial, one trial at a time; pass n_jobs=1 "
                         "and start more jobs on the same storage to run trials side by side.")
    if not (init_process_group(backend) and get_world_size() > 1):
        made = _study_of(study)
        made.optimize(lambda t: _run(objective, DistributedTrial(t, t.number)), n_trials, timeout=timeout, **kwargs)
        return made
    if get_rank() != 0:
        _follow(objective, backend)
        return None
    log.info("optimize: rank 0 of %d runs the study; every rank trains each trial.", get_world_size())
    try:
        made = _study_of(study)
        made.optimize(lambda t: _lead(objective, t, backend), n_trials, timeout=timeout, **kwargs)
    except Exception as exc:
        _announce(("end", f"{type(exc).__name__}: {exc}"), backend)
        raise
    _announce(("end", None), backend)
    return made


def _study_of(study: optuna.Study | Callable[[], optuna.Study]) -> optuna.Study:
    made = study if isinstance(study, optuna.Study) else study()
    if not isinstance(made, optuna.Study):
        raise TypeError(f"optimize: study() returned a {type(made).__name__}; it must return an optuna.Study "
                        "(optuna.create_study(...) or optuna.load_study(...)).")
    return made


def _announce(message: tuple[str, Any] | None, backend: str | None) -> tuple[str, Any]:
    """Rank 0's next word to the others: ``("trial", number)`` or ``("end", error or None)``."""
    init_process_group(backend)         # joined again if the last objective closed the group
    return broadcast_object(message)    # type: ignore[no-any-return]


def _lead(objective: Objective, trial: optuna.trial.Trial, backend: str | None) -> Any:
    """Rank 0, inside ``study.optimize``: tell the others that a trial starts, then run it."""
    _announce(("trial", trial.number), backend)
    return _run(objective, DistributedTrial(trial, trial.number), backend)


def _follow(objective: Objective, backend: str | None) -> None:
    """Every rank but 0: run each trial rank 0 announces, until its study ends."""
    last: Exception | None = None       # the last trial's error (every rank raised the same)
    while True:
        kind, detail = _announce(None, backend)
        if kind == "end":
            if detail is None:
                return
            if last is not None:        # the study ended on the trial's error, not caught (catch=...)
                raise last
            raise RuntimeError(f"optimize: the study ended with an error on rank 0: {detail}")
        last = None
        try:
            _run(objective, DistributedTrial(None, int(detail)), backend)
        except optuna.TrialPruned:
            pass
        except Exception as exc:  # noqa: BLE001 - rank 0 decides whether the study goes on (catch=...)
            last = exc


def _run(objective: Objective, trial: DistributedTrial, backend: str | None = None) -> Any:
    """The objective on every rank; an error anywhere is raised everywhere; a pruned trial is raised pruned."""
    error: Exception | None = None
    try:
        value = objective(trial)
        for pruning in trial._unchecked():
            log.warning("optimize: trial %d was pruned but the objective returned without calling "
                        "OptunaPruning.check_pruned() after fit; it is recorded as pruned.", trial.number)
            pruning.check_pruned()
    except Exception as exc:
        if trial.world_size == 1:
            raise
        error = exc
    if trial.world_size > 1:
        init_process_group(backend)     # joined again if the objective closed the group
        _agree(error, trial)
        if error is not None:           # optuna.TrialPruned, on every rank that did not fail
            raise error
    return value


def _agree(error: Exception | None, trial: DistributedTrial) -> None:
    """Every rank raises the same error when the objective failed on any rank (``raise_together``).

    An error that was the same on every rank already (the trainer raises its errors on every rank at
    once) keeps its message; otherwise it names the ranks that failed and the first one's error.
    """
    mine = None if error is None else f"{type(error).__name__}: {error}"

    def describe(found: dict[int, str]) -> str:
        if mine is not None and len(found) == trial.world_size and set(found.values()) == {mine}:
            return str(error)
        failed = sorted(found)
        ranks = ("every rank" if len(failed) == trial.world_size else
                 f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))}")
        return f"the objective of trial {trial.number} failed on {ranks}: {found[failed[0]]}"

    raise_together(None if isinstance(error, optuna.TrialPruned) else error, f"the objective of trial {trial.number}",
                   describe=describe)
