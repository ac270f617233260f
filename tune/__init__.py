"""Ray Tune searches over ELSA's hyperparameters (``elsa tune``) and the presets they produce.

One module per job:

* :mod:`tune.space`   - the search space (YAML) and how a sample becomes PruneConfig overrides
* :mod:`tune.seed`    - the first points of every search: the budget rule's setting, then Table 5's
* :mod:`tune.search`  - search algorithm (Optuna), ASHA scheduler, divergence stopper
* :mod:`tune.trial`   - one trial: the pipeline's TorchTrainer driven from a Tune function
* :mod:`tune.runs`    - MLflow parent/child runs of a search and their final status
* :mod:`tune.results` - one row per trial, the best configuration, the preset-file entry
* :mod:`tune.state`   - the search's own record, for ``--resume``
* :mod:`tune.runner`  - a whole search: one Tuner per sparsity, resume, presets
* :mod:`tune.cli`     - the ``elsa tune`` options and summary

Table 5 and the preset files searches write are read and written by :mod:`elsa.presets`
(plain data about the method, below every layer that uses it). Import nothing heavy here.
"""
