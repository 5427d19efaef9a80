"""Optuna/Ray Tune glue that needs the ``tune`` extra (imported only while tuning). Module-level classes:
Ray checkpoints the searcher, sampler included, by pickling it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

__all__ = ["ConstrainedOptunaSearch", "UnvisitedGridSampler"]


class UnvisitedGridSampler(optuna.samplers.GridSampler):
    """GridSampler that always picks an unvisited point (the lowest grid id not finished or running).

    Optuna's own one maps trial number i to grid point i, which repeats points once a resumed study starts
    with the finished trials added."""

    def before_trial(self, study, trial):
        if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
            return
        todo = self._get_unvisited_grid_ids(study) or list(range(len(self._all_grids)))
        study._storage.set_trial_system_attr(trial._trial_id, "search_space", self._search_space)
        study._storage.set_trial_system_attr(trial._trial_id, "grid_id", int(min(todo)))

    def after_trial(self, study, trial, state, values):
        pass  # Ray Tune counts the trials; Optuna's study.stop() is only valid inside study.optimize

    def grid_attrs(self, params: dict[str, Any]) -> dict[str, Any]:
        """System attributes that mark ``params`` as a visited grid point (for trials added to the study)."""
        point = tuple(params[n] for n in self._param_names)
        ids = [i for i, g in enumerate(self._all_grids) if tuple(g) == point]
        return {"search_space": self._search_space, "grid_id": ids[0]} if ids else {}


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that (a) hands each trial's constraint values (result key ``constraints``, <= 0 feasible)
    to the sampler, (b) marks a trial that measured nothing as pruned, and (c) starts from the trials a resumed
    tune already finished: ``prior`` = [(params, values or None, constraints)]."""

    def __init__(
        self, *args: Any, prior: Sequence[tuple[dict[str, Any], list[float] | None, list[float]]] = (), **kwargs: Any
    ) -> None:
        self._prior = list(prior)
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        smp = self._ot_study.sampler
        for params, values, cons in self._prior:
            if set(params) != set(self._space):
                continue  # a journal from another space: not a point of this study
            state = optuna.trial.TrialState.COMPLETE if values is not None else optuna.trial.TrialState.PRUNED
            attrs = smp.grid_attrs(params) if isinstance(smp, UnvisitedGridSampler) else {}
            self._ot_study.add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions=self._space,
                    values=values,
                    state=state,
                    user_attrs={"constraints": cons},
                    system_attrs=attrs,
                )
            )

    def on_trial_complete(self, trial_id, result=None, error=False):
        ot_trial = self._ot_trials.get(trial_id)
        if result and ot_trial is not None and "constraints" in result:
            ot_trial.set_user_attr("constraints", list(result["constraints"]))
        if result and any(result.get(m) is None for m in self._metric):
            result = None  # unmeasured (failed run): pruned in the study, recorded as infeasible in the journal
        super().on_trial_complete(trial_id, result=result, error=error)
