"""Launching sweeps: grid expansion and the skip/resume plan (:mod:`.plan`), the SLURM tools
(:mod:`.slurm`) and the status view of a run store (:mod:`.status`). The Hydra sweeper and
launchers that use them live in ``hydra_plugins/diffq_bench``."""
