"""The float reference printed after a quantized run (diffq_bench.launch.reference)."""
from diffq_bench.config import compose, to_container
from diffq_bench.launch.reference import float_overrides, reference_line
from diffq_bench.xp import Xp


def _result(sig, quant, ppl, size):
    return {"sig": sig, "task": "wikitext_mini", "quant": quant, "metric": "ppl",
            "metrics": {"test_ppl": ppl, "true_size_mb": size}}


def _done(root, overrides, ppl, size, quant="none"):
    cfg = compose(overrides + [f"paths.root={root}"])
    xp = Xp(root, cfg)
    xp.create()
    xp.write_result(_result(xp.sig, quant, ppl, size))
    xp.write_status("DONE")
    return xp


def test_float_overrides_drop_every_quantizer_key_and_keep_the_recipe():
    got = float_overrides(["task=digits", "quant=diffq", "lambda=5", "group_size=8", "quant.min_bits=3",
                           "+quant.foo=1", "optim.quant_lr=0.05", "optim.lr=0.01", "init=run:quant=none",
                           "train.epochs=3", "paths.root=x"])
    assert got == ["task=digits", "optim.lr=0.01", "train.epochs=3", "paths.root=x", "quant=none"]


def test_the_default_run_is_compared_with_the_float_run_of_the_same_recipe(tmp_path):
    # The default run carries a DiffQ-only recipe value (conf/recipe/wikitext_mini_diffq.yaml): the
    # reference must still be the plain `quant=none` run, whose config lacks it.
    float_xp = _done(tmp_path, ["quant=none", "train.epochs=1"], 237.3, 3.26)
    plain = to_container(compose(["train.epochs=1", f"paths.root={tmp_path}"]))
    line = reference_line(_result("q", "diffq", 242.8, 0.452), plain, ["train.epochs=1", f"paths.root={tmp_path}"])
    assert line == (f"float reference (run {float_xp.sig}): test ppl 237.3, 3.26 MiB file -> "
                    "this run's file is 7.21× smaller, test ppl +5.5")


def test_a_missing_float_run_names_the_command_that_makes_it(tmp_path):
    plain = to_container(compose(["lambda=5", "train.epochs=1", f"paths.root={tmp_path}"]))
    line = reference_line(_result("q", "diffq", 242.8, 0.452), plain,
                          ["lambda=5", "train.epochs=1", "runtime.progress=false", f"paths.root={tmp_path}"])
    assert line == ("float reference: not in the run store yet "
                    f"(diffq-bench train.epochs=1 paths.root={tmp_path} quant=none makes it)")


def test_a_fine_tuned_run_is_compared_with_its_parent(tmp_path):
    parent = _done(tmp_path, ["quant=none", "train.epochs=2"], 230.0, 3.26)
    _done(tmp_path, ["quant=none", "train.epochs=1"], 999.0, 3.26)  # same command line minus quant: not the parent
    plain = to_container(compose(["train.epochs=1", "init='run:quant=none train.epochs=2'", f"paths.root={tmp_path}"]))
    line = reference_line(_result("q", "diffq", 240.0, 0.5), plain, ["train.epochs=1"])
    assert line.startswith(f"float reference (run {parent.sig}): test ppl 230.0,")


def test_a_float_run_prints_no_reference(tmp_path):
    plain = to_container(compose(["quant=none", f"paths.root={tmp_path}"]))
    assert reference_line(_result("f", "none", 237.3, 3.26), plain, ["quant=none"]) is None
