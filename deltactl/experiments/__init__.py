"""Experiments: discovery and running of the study folders in ``experiments/``, and helpers their scripts use.

The library never imports an experiment script: :mod:`deltactl.experiments.runner` finds ``experiments/*/``
folders (a ``config.json`` and a ``run.py`` each) and runs ``run.py`` as a subprocess. Study scripts import
:mod:`deltactl.experiments.study` (arguments, config, results) and :mod:`deltactl.experiments.finetune`
(budgeted training runs on task subsets) — never the other way round.
"""

from deltactl.experiments.runner import Study, discover, experiments_root, run_study

__all__ = ["Study", "discover", "experiments_root", "run_study"]
