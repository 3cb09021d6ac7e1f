"""Paper tables from the run store: load (:mod:`.load`), group (:mod:`.table`), print
(:mod:`.render`) and plot (:mod:`.plots`). ``diffq-bench-table`` is wired in :mod:`diffq_bench.cli`."""
