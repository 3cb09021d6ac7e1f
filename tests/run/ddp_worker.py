"""One process of a data-parallel toy run, started by torchrun from tests/run/test_distributed.py.

argv: <toy conf folder> <run store root> <overrides...>. Writes ``<root>/state.rank<r>.json`` with
a digest of the model and quantizer state after training (rank equality is checked by the test),
and ``<root>/eval.rank<r>.json`` with the sharded and the whole evaluation of the final model.
``DDP_FAIL_RANK``/``DDP_FAIL_STEP``: that rank raises at that training step. ``DDP_QUANTS``
(comma-separated): run one run per quantizer in turn (``quant=<q>``, min_size 0), in the same two
processes; the files are then ``state.<q>.rank<r>.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffq_bench import cli, distributed, train  # noqa: E402
from diffq_bench.config import compose  # noqa: E402
from diffq_bench.tasks import TASKS  # noqa: E402

import conftest  # noqa: E402

TASKS["toy"] = conftest.ToyTask


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    conf, root, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    fit = train.Trainer.fit
    rank = int(os.environ.get("RANK", 0))
    current = {"tag": ""}

    def recorded_fit(self):
        fit(self)
        qstate = [v for v in self.quantizer.state_dict().values() if isinstance(v, torch.Tensor)]
        state = {"model": digest(self.model.state_dict().values()),
                 "quantizer": digest(self.trainable() + qstate),
                 "buffers": digest(list(self.model.buffers()))}
        (root / f"state{current['tag']}.rank{rank}.json").write_text(json.dumps(state))
        if hasattr(self.task, "evaluate_parts"):
            self.model.eval()
            with torch.no_grad():
                sharded = self.evaluate(self.model, "test")
                whole = self.task.evaluate(self.model, "test")
            (root / f"eval.rank{rank}.json").write_text(json.dumps({"sharded": sharded, "whole": whole}))
    train.Trainer.fit = recorded_fit

    fail_rank = os.environ.get("DDP_FAIL_RANK")
    if fail_rank is not None and int(fail_rank) == rank:
        step = train.Trainer._optimizer_step

        def failing(self, total):
            if self.global_step + 1 == int(os.environ.get("DDP_FAIL_STEP", "2")):
                raise RuntimeError(f"injected failure on rank {rank}")
            step(self, total)
        train.Trainer._optimizer_step = failing

    quants = [q for q in os.environ.get("DDP_QUANTS", "").split(",") if q]
    runs = [(f".{q}", [f"quant={q}"] + (["quant.min_size=0"] if q != "none" else [])) for q in quants] or [("", [])]
    cli.INTERRUPT.install()
    for tag, extra in runs:
        current["tag"] = tag
        cfg = compose([f"hydra.searchpath=[file://{conf}]", "task=toy", f"paths.root={root}",
                       "runtime.progress=false", *overrides, *extra])
        try:
            cli._hydra_task(cfg)
        except SystemExit as exc:
            print(f"EXIT {exc.code} rank {rank}", flush=True)
            distributed.shutdown()
            raise
    distributed.shutdown()


if __name__ == "__main__":
    main()
