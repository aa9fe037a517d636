"""Optuna for sweeps with in-training scores (imported only when a sweep uses ``search: optuna``)."""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch


class ScoredOptunaSearch(OptunaSearch):
    """OptunaSearch that sees only the results carrying the metric. With ``eval_every`` the progress
    reports between two in-training scores have none, and OptunaSearch indexes every result by the
    metric: its ``on_trial_result`` raised KeyError on the first progress report and ended the sweep."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)
