"""What a local ``-m`` sweep prints: where the logs are, one line per run as it finishes (DONE with
its result row, FAILED with its error and log), and at the end the table ``diffq-bench-table``
renders for exactly the sweep's runs. Before, it printed "running N jobs locally" and nothing else."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffq_bench.results.report import format_line, format_row

REPO = Path(__file__).resolve().parents[2]
RESULT = {"sig": "abc123", "task": "digits", "quant": "diffq", "metric": "top1",
          "metrics": {"test_top1": 91.25, "true_size_mb": 0.3278, "compression": 3.59,
                      "bits_per_weight": 8.19, "wall_time_s": 6.84}}


def test_the_sweep_line_has_the_cells_of_the_run_row():
    row = format_row(RESULT).splitlines()
    cells = [c.strip() for c in row[2].strip("|").split("|")][3:]
    titles = [c.strip() for c in row[0].strip("|").split("|")][3:]
    assert format_line(RESULT) == " | ".join(f"{t} {c}" for t, c in zip(titles, cells))
    assert format_line(RESULT) == ("test top1 91.25 | size (MiB) 0.3278 | compression 3.59× | "
                                   "bits/weight 8.19 | wall time (s) 6.8")
    assert format_line({"sig": "x", "value": 3}) == ""  # not a diffq-bench result: no row


def test_a_metric_that_rounds_to_an_integer_keeps_its_decimal():
    # 242.996 printed "243" next to the float run's "236.7": it read as a rounded, other kind of number
    result = {**RESULT, "metric": "ppl", "metrics": {**RESULT["metrics"], "test_ppl": 242.996}}
    assert format_line(result).startswith("test ppl 243.0 | ")


def _cli(*args: str, cwd: Path, env: dict = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from diffq_bench.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.mark.slow
def test_local_sweep_prints_each_run_and_the_sweep_table(tmp_path):
    paths = [f"paths.root={tmp_path / 'store'}", f"paths.data={tmp_path / 'data'}",
             f"paths.cache={tmp_path / 'cache'}"]
    out = _cli("-m", "task=digits", "+preset=debug", "seed=0,1", *paths, cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert re.search(r"logs: each run's output in \S+/\.submitit/<job id>, its log\.txt and status\.json "
                     r"in \S+/xps/<run>", text), text
    lines = re.findall(r"\[(\d)/2\] DONE seed=(\d) ([0-9a-f]{12}) \| test top1 \S+ \| size \(MiB\) \S+ \| "
                       r"compression \S+× \| bits/weight \S+ \| wall time \(s\) \S+", text)
    assert sorted((n, s) for n, s, _ in lines) == [("1", "0"), ("2", "1")], text
    assert {sig for _, _, sig in lines} == {p.name for p in (tmp_path / "store" / "xps").iterdir()}
    assert "it/s" not in text and "epoch 1/1:" not in text  # progress bars stay in the run logs
    head = "sweep table: 2 of 2 run(s) finished (every run of the store: diffq-bench-table --root "
    assert head in out.stdout, out.stdout
    table = subprocess.run([sys.executable, "-c", "from diffq_bench.cli import table_main; table_main()",
                            "--root", str(tmp_path / "store")], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    printed = out.stdout.split(head, 1)[1].split("\n", 2)[2]  # after the header line and a blank line
    assert printed == table.stdout
    # one row, two seeds; tested on the debug preset's 4 items: marked
    assert "| DiffQ (λ=1, g=16) † |" in printed and "| 2 |" in printed
    assert "† tested on the first 4 evaluation items only" in printed
    # submitit's folder pattern is not left behind as an empty '%j' folder
    assert list(tmp_path.rglob(".submitit")) and not list(tmp_path.rglob("%j"))


# The real CLI with the test task registered, and a variant that fails in its first step
# (cloudpickle ships ``task_fn`` by value to the job, which imports conftest from PYTHONPATH).
APP = """\
import hydra
from conftest import ToyTask
from diffq_bench.config import find_conf_dir


class ExplodingToyTask(ToyTask):
    name = "toy_exploding"

    def step(self, model, batch):
        raise FloatingPointError("deliberate failure in a training step")


def register():
    from diffq_bench.tasks import TASKS
    TASKS["toy"] = ToyTask
    TASKS["toy_exploding"] = ExplodingToyTask


def task_fn(cfg):
    from diffq_bench.cli import _hydra_task
    register()  # in the job
    _hydra_task(cfg)


register()  # in the sweeping process, which validates every config before launching
hydra.main(config_path=str(find_conf_dir()), config_name="config", version_base="1.3")(task_fn)()
"""


@pytest.mark.slow
def test_local_sweep_failed_run_is_failed_in_its_line_and_the_summary(tmp_path):
    from fixtures import TOY_YAML
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    small = TOY_YAML.replace("n_train: 192", "n_train: 32").replace("hidden: 128", "hidden: 16")
    small = small.replace("epochs: 2", "epochs: 1")
    assert small.count("32") and small.count("16") and small.count("epochs: 1")
    (conf / "task" / "toy.yaml").write_text(small)
    (conf / "task" / "toy_exploding.yaml").write_text(small.replace("name: toy", "name: toy_exploding"))
    (tmp_path / "app.py").write_text(APP)
    env = {**os.environ, "DIFFQ_BENCH_CONF": str(conf),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, str(tmp_path / "app.py"), "-m", "task=toy,toy_exploding", "quant=none",
         f"paths.root={tmp_path / 'store'}",
         f"paths.data={tmp_path / 'data'}", f"paths.cache={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert re.search(r"\[1/2\] DONE task=toy [0-9a-f]{12} \| test acc \S+ \| size \(MiB\)", text), text
    failed = re.search(r"\[2/2\] FAILED task=toy_exploding ([0-9a-f]{12}) \| FloatingPointError: deliberate "
                       r"failure in a training step \| log: (\S+_log\.err)\n", text)
    assert failed, text
    assert "deliberate failure in a training step" in Path(failed.group(2)).read_text()
    summary = out.stderr.split("1 of 2 run(s) FAILED", 1)
    assert len(summary) == 2 and failed.group(1) in summary[1], out.stderr[-3000:]
    assert "FloatingPointError: deliberate failure" in summary[1]
    assert "sweep table: 1 of 2 run(s) finished" in out.stdout and "## toy" in out.stdout, out.stdout


def test_a_run_tested_on_a_subset_says_so_in_its_row_and_line():
    """The debug preset's runs test on 4 items: the printed row and sweep line say so (status and
    tables already did); a full-test run prints nothing extra."""
    debug = {**RESULT, "axes": {"task.eval_subset": 4}}
    assert format_row(debug).splitlines()[-1] == \
        "tested on the first 4 items only (task.eval_subset=4): not a real result"
    assert format_line(debug).endswith(" | tested on the first 4 items only")
    full = {**RESULT, "axes": {"task.eval_subset": 0}}
    assert format_row(full) == format_row(RESULT) and format_line(full) == format_line(RESULT)
