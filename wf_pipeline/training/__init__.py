"""What happens to the weights over time: dense training, one-shot sweeps and gradual prune-and-fine-tune.

Modules: ``optimizer`` (optimiser, per-step LR and weight decay), ``lr_schedule`` (schedules as pure
functions), ``epoch`` (one training epoch, evaluation), ``dense`` (the ``train`` stage), ``oneshot``
(one-shot sweeps), ``gradual/`` (the ``compress`` pruning stage).
"""
