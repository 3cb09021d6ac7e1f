"""Hydra plugins of diffq-bench: the ``grid`` sweeper and the truthful SLURM launcher.

Hydra discovers them through the ``hydra_plugins`` namespace package; the config nodes are
registered in :mod:`.grid_sweeper` (``hydra/sweeper=grid``) and selected for SLURM by
``conf/hydra/launcher/slurm.yaml`` (``_target_`` of :mod:`.slurm_launcher`).
"""
