"""Hydra plugins of diffq-bench: the ``grid`` sweeper and the local and SLURM launchers.

Hydra discovers them through the ``hydra_plugins`` namespace package. The sweeper's config node is
registered in :mod:`.grid_sweeper` (``hydra/sweeper=grid``); the launchers are selected by
``conf/hydra/launcher/{local,slurm}.yaml`` (``_target_``); both run their jobs through :mod:`.job`.
"""
