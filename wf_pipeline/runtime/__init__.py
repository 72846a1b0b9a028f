"""Run-time utilities the stages share: atomic writes, the run directory, device choice,
torch.distributed, the ``wf-torchrun`` launcher, and the progress-reporting interface.

Modules: ``atomic_io``, ``rundir``, ``device``, ``distributed``, ``launch``, ``progress``. Imported by
the packages above (data, deploy, training, ...), it imports only ``errors`` and the recipe schema.
"""
