"""Vision tasks: contract checks, data errors, and every task x every quantizer end to end."""
import dataclasses
import json

import pytest
import torch

from diffq_bench import cli
from diffq_bench.config import compose, find_conf_dir
from diffq_bench.data.errors import DataCorruptError, DataMissingError
from diffq_bench.tasks import TASKS, get_task
from diffq_bench.tasks.vision import VISION_TASKS, create_image_model

from fixtures import make_cifar10_fixture, make_imagefolder, py2_style_batch

torch.set_num_threads(1)

QUANT_CONFS = sorted(p.stem for p in (find_conf_dir() / "quant").glob("*.yaml"))
COMMON = ["train.epochs=1", "train.steps_per_epoch=2", "train.warmup_steps=0", "runtime.progress=false"]
SMALL_RESNET = "++task.model_kwargs={widths:[32,64],blocks:[1,1],stem_stride:2}"
# Debug-size overrides per registered vision task (data fixtures built by `_data`).
DEBUG = {
    "digits": ["task=digits", "task.train_subset=32", "task.eval_subset=24", "task.batch_size=16"],
    "cifar10": ["task=cifar10_resnet18", "task.model=resnet", SMALL_RESNET, "task.batch_size=8",
                "task.verify_checksums=false", "task.valid_size=4"],
    "cifar100": ["task=cifar100_mobilenet", "task.model=resnet", SMALL_RESNET, "task.batch_size=8",
                 "task.verify_checksums=false"],
    "imagenet": ["task=imagenet_deit_b", "task.img_size=32", "task.batch_size=4",
                 "++task.model_kwargs={img_size:32,patch_size:8,embed_dim:64,depth:1,num_heads:2}"],
}


def make_cifar100_fixture(root, n=16):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for name in ("train", "test"):
        data = torch.randint(0, 256, (n, 3072), generator=gen, dtype=torch.uint8).numpy()
        py2_style_batch(folder / name, data, [i * 7 % 100 for i in range(n)], label_key="fine_labels")
    import pickle
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"k{i}" for i in range(100)]},
                                               protocol=2))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_cifar10_fixture(root)
    make_cifar100_fixture(root)
    make_imagefolder(root / "imagenet", per_class=3, size=36)
    return root


def test_registry_has_vision_tasks():
    for name, cls in VISION_TASKS.items():
        assert TASKS[name] is cls and cls.metric == "top1" and cls.lower_is_better is False
    assert set(DEBUG) == set(VISION_TASKS)  # a new vision task must get an e2e entry here


def _cases():
    for task in sorted(DEBUG):
        for quant in QUANT_CONFS:
            yield pytest.param(task, quant, id=f"{task}-{quant}")


def _paths(data_root, tmp_path):
    return [f"paths.root={tmp_path / 'outputs'}", f"paths.data={data_root}",
            f"paths.cache={tmp_path / 'cache'}"]


@pytest.mark.slow
@pytest.mark.parametrize("task,quant", list(_cases()))
def test_e2e_every_task_every_quantizer(task, quant, data_root, tmp_path, capsys):
    """Train, validate, test with true quantization, export, reload: same top-1 after reload."""
    cfg = compose([*DEBUG[task], f"quant={quant}", *COMMON, *_paths(data_root, tmp_path)])
    result = cli.run(cfg)
    assert "| test top1 |" in capsys.readouterr().out
    m = result["metrics"]
    assert result["task"] == task and result["metric"] == "top1"
    assert 0 <= m["test_top1"] <= 100 and 0 <= m["test_top5"] <= 100 and m["test_loss"] > 0
    assert m["test_top1_subset"] == m["test_top1_subset_restored"] and m["restore_exact"] == 1.0
    assert m["true_size_mb"] > 0
    if quant != "none":
        assert m["compression"] > 1.2, m
    # Compression is against the task's float architecture, whatever the quantizer added to it.
    from omegaconf import OmegaConf
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    plain = get_task(task_cfg.pop("name"), **task_cfg)
    plain.setup(data_root, tmp_path / "cache", "cpu")
    n_params = sum(p.numel() for p in plain.build_model().parameters())
    assert m["params"] == n_params and m["float_size_mb"] == n_params * 4 / 2 ** 20
    (folder,) = list((tmp_path / "outputs" / "xps").iterdir())
    assert json.loads((folder / "status.json").read_text())["state"] == "DONE"


@pytest.mark.slow
def test_digits_cifar_format_e2e(data_root, tmp_path):
    cfg = compose(["task=digits_cifar", "quant=diffq", "task.train_subset=32", "task.eval_subset=24",
                   "task.batch_size=16", *COMMON, *_paths(data_root, tmp_path)])
    result = cli.run(cfg)
    assert result["metrics"]["test_top1_subset"] == result["metrics"]["test_top1_subset_restored"]
    assert (data_root / "digits" / "cifar-10-batches-py" / "checksums.json").is_file()


def test_both_digit_formats_hold_the_same_splits(tmp_path):
    sizes = {}
    # each format's augmentation is owned by its config file (digits.yaml, digits_cifar.yaml)
    augment = {"imagefolder": {}, "cifar": {"augment": {"padding": 2, "hflip": 0.0}}}
    for fmt in ("imagefolder", "cifar"):
        task = get_task("digits", format=fmt, batch_size=8, **augment[fmt])
        task.setup(tmp_path, tmp_path / "cache", "cpu")
        sizes[fmt] = {k: len(v) for k, v in task.datasets.items()}
        x, y = task.datasets["test"][0]
        assert x.shape == (3, 32, 32) and task.num_classes == 10
    assert sizes["imagefolder"] == sizes["cifar"] == {"train": 1257, "valid": 180, "test": 360}


def test_step_and_evaluate_contract(data_root, tmp_path):
    task = get_task("cifar10", model="resnet", model_kwargs={"widths": [8], "blocks": [1]},
                    verify_checksums=False, batch_size=8, valid_size=4)
    task.setup(data_root, tmp_path, "cpu", seed=3)
    model = task.build_model()
    batches = list(task.train_batches(0))
    assert len(batches) == 2 and batches[0][0].shape == (8, 3, 32, 32)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, task.train_batches(0)))
    loss, metrics = task.step(model, batches[0])
    assert loss.requires_grad and set(metrics) == {"top1"}
    loss.backward()
    model.train()
    out = task.evaluate(model, "valid")
    assert set(out) == {"top1", "top5", "loss"} and model.training  # mode restored
    assert task.evaluate(model, "test")["top5"] >= task.evaluate(model, "test")["top1"]
    with pytest.raises(ValueError, match="valid, test"):
        task.evaluate(model, "train")


def test_mixup_step(data_root, tmp_path):
    task = get_task("imagenet", model="resnet", model_kwargs={"widths": [8], "blocks": [1]},
                    img_size=16, batch_size=4, mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0,
                                                      "label_smoothing": 0.1})
    task.setup(data_root, tmp_path, "cpu")
    batch = next(iter(task.train_batches(0)))
    again = next(iter(task.train_batches(0)))
    assert batch[1].shape == (4, 3) and torch.allclose(batch[1].sum(-1), torch.ones(4))  # soft targets
    assert torch.equal(batch[0], again[0]) and torch.equal(batch[1], again[1])  # seeded mixing
    loss, metrics = task.step(task.build_model(), batch)
    assert loss.item() > 0 and metrics == {}
    with pytest.raises(ValueError, match="even batch_size"):
        get_task("imagenet", batch_size=3, mixup={"mixup_alpha": 0.8}).setup(data_root, tmp_path, "cpu")


def test_missing_imagenet_names_path_and_preparation(tmp_path):
    task = get_task("imagenet")
    with pytest.raises(DataMissingError, match=r"imagenet/train.*prepare_imagenet"):
        task.setup(tmp_path, tmp_path, "cpu")
    with pytest.raises(DataMissingError, match="cifar-100-python"):
        get_task("cifar100").setup(tmp_path, tmp_path, "cpu")


def test_official_checksums_enforced_by_default(data_root, tmp_path):
    with pytest.raises(ValueError, match="verify_checksums=false"):
        get_task("cifar10").setup(data_root, tmp_path, "cpu")


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 0}, "batch_size"), ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"train_subset": -1}, "train_subset"), ({"format": "tfrecord"}, "imagefolder, cifar"),
    ({"format": "cifar", "img_size": 64}, "32x32"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_task("digits", **kwargs)


def test_bad_augment_option(data_root, tmp_path):
    task = get_task("cifar10", verify_checksums=False, augment={"scale": [0.5, 1]})
    with pytest.raises(ValueError, match="padding, hflip"):
        task.setup(data_root, tmp_path, "cpu")


def test_unknown_model_lists_valid():
    with pytest.raises(ValueError, match="resnet18.*timm"):
        create_image_model("resnet1000", 10)


@pytest.mark.slow
@pytest.mark.parametrize("conf,params", [("imagenet_deit_b", 86_567_656),
                                         ("imagenet_effnet_b3", 12_233_232),
                                         ("imagenet_resnet50", 25_557_032)])
def test_imagenet_configs_build_paper_models(conf, params):
    """The ImageNet task files build the paper's timm models (random init, nothing downloaded)."""
    task_cfg = dict(compose([f"task={conf}"])["task"])
    kwargs = dict(task_cfg.pop("model_kwargs"))
    model = create_image_model(task_cfg["model"], 1000, kwargs)
    assert sum(p.numel() for p in model.parameters()) == params


# ------------------------------------------------------------------- bad data: errors or recorded skips
def _tiny_imagenet(tmp_path, **kwargs):
    make_imagefolder(tmp_path / "imagenet", per_class=3, size=36)
    task = get_task("imagenet", model="resnet", img_size=32, batch_size=4, eval_batch_size=4,
                    model_kwargs={"widths": [8], "blocks": [1], "stem_stride": 2}, **kwargs)
    return task


def test_corrupt_image_fails_the_task_with_its_path(tmp_path):
    task = _tiny_imagenet(tmp_path)
    bad = tmp_path / "imagenet" / "val" / "dog" / "1.png"
    bad.write_bytes(b"\x89PNG garbage")
    task.setup(tmp_path, tmp_path / "cache", "cpu")
    with pytest.raises(DataCorruptError, match=rf"{bad} is not a readable image.*skip_bad_files=true"):
        task.evaluate(task.build_model(), "valid")


def test_corrupt_image_skipped_on_request_and_counted(tmp_path):
    task = _tiny_imagenet(tmp_path, skip_bad_files=True)
    bad = tmp_path / "imagenet" / "val" / "dog" / "1.png"
    bad.write_bytes(b"")
    (tmp_path / "imagenet" / "train" / "eel" / "0.png").write_bytes(b"garbage")
    task.setup(tmp_path, tmp_path / "cache", "cpu")
    assert task.skipped_files() == {"train": 0, "valid": 0, "test": 0}
    metrics = task.evaluate(task.build_model(), "valid")
    for _ in task.train_batches(0):
        pass
    assert task.skipped_files() == {"train": 1, "valid": 1, "test": 0}
    assert metrics["top1"] in {100.0 * k / 8 for k in range(9)}  # 8 images scored, not 9 (no substitute)


def test_skip_bad_files_refused_for_cifar_batches():
    with pytest.raises(ValueError, match="skip_bad_files=true does not apply to cifar10"):
        get_task("cifar10", skip_bad_files=True)
    with pytest.raises(ValueError, match="format=imagefolder only"):
        get_task("digits", format="cifar", skip_bad_files=True)


def test_md5_advice_works_for_each_cifar_format_task(data_root, tmp_path):
    """The failure's advice names options the task has: Hydra rejects task.verify_checksums for digits."""
    with pytest.raises(DataCorruptError, match=r"task\.verify_checksums=false"):
        get_task("cifar10").setup(data_root, tmp_path / "cache", "cpu")
    assert "verify_checksums" not in {f.name for f in dataclasses.fields(TASKS["digits"])}
    cifar_format = {"format": "cifar", "augment": {"padding": 2, "hflip": 0.0}}
    task = get_task("digits", **cifar_format)
    task.setup(tmp_path / "data", tmp_path / "cache", "cpu")  # writes the embedded set once
    folder = task.data_dir
    with open(folder / "test_batch", "r+b") as f:
        f.seek(300)
        byte = f.read(1)
        f.seek(300)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(DataCorruptError) as err:
        get_task("digits", **cifar_format).setup(tmp_path / "data", tmp_path / "cache", "cpu")
    assert f"delete {folder}" in str(err.value) and "verify_checksums" not in str(err.value)


@pytest.mark.slow
def test_skipped_files_recorded_in_result_json(tmp_path):
    make_imagefolder(tmp_path / "data" / "imagenet", per_class=3, size=36)
    (tmp_path / "data" / "imagenet" / "val" / "cat" / "2.png").write_bytes(b"")
    cfg = compose([*DEBUG["imagenet"], "quant=none", *COMMON, *_paths(tmp_path / "data", tmp_path)])
    with pytest.raises(DataCorruptError, match=r"val/cat/2\.png is not a readable image"):
        cli.run(cfg)
    cfg = compose([*DEBUG["imagenet"], "quant=none", "task.skip_bad_files=true", *COMMON,
                   *_paths(tmp_path / "data", tmp_path / "skip")])
    metrics = cli.run(cfg)["metrics"]
    # valid and test both read val/ (no test/ folder); nothing was skipped in train
    assert metrics["skipped_files_valid"] == metrics["skipped_files_test"] == 1
    assert "skipped_files_train" not in metrics


def test_eval_subset_set_after_setup_is_honoured(tmp_path):
    # finish.py's restore check shrinks task.eval_subset after setup: the image tasks apply it when
    # they evaluate too (before, only at setup: the check's "subset" was the whole test set)
    from omegaconf import OmegaConf
    cfg = OmegaConf.to_container(compose(DEBUG["digits"]).task, resolve=True)
    task = get_task(cfg.pop("name"), **cfg)
    task.setup(tmp_path / "data", tmp_path / "cache", "cpu")
    model = task.build_model().eval()
    assert sum(task.evaluate_parts(model, "test")["count"]) == 24
    task.eval_subset = 5
    assert sum(task.evaluate_parts(model, "test")["count"]) == 5
    task.eval_subset = 24  # back: the same 24 items as set up
    assert sum(task.evaluate_parts(model, "test")["count"]) == 24
