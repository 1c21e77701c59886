"""MNIST, FashionMNIST and CIFAR-10 through the real torchvision readers, on tiny files in the real formats.

Nothing is downloaded: tests/tinydata.py writes IDX files and CIFAR pickles,
and CIFAR-10's md5 table is patched to the tiny files' real sums so that
torchvision's integrity check still runs on them.
"""

from __future__ import annotations

import gzip
import math
import sys
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision

from dtrain.config import DataConfig, load_config
from dtrain.data.batches import TensorBatches
from dtrain.data.builtin import build_datasets
from dtrain.data.download import fetch_datasets
from dtrain.data.loaders import build_loaders
from dtrain.runtime.dist import DistState
from dtrain.errors import DTrainError
from dtrain.run import train
from dtrain.data.vision import download_files, vision_datasets
from helpers import dtrain, records
from tinydata import Tiny, cifar10_checksum_tables, write_cifar10, write_mnist

N_TRAIN, N_TEST = 64, 20

# The classic normalisation, written out here rather than read from dtrain.data.vision,
# so a wrong constant there fails the pixel checks.
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
FOLDERS = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw", "cifar10": "cifar-10-batches-py"}
CLASS_NAMES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}
SINGLE = DistState("single", 0, 0, 1, "gloo", torch.device("cpu"))
COMMON = ["train.device=cpu", "log.progress=lines", "data.batch_size=16", "data.eval_batch_size=8"]


def patch_cifar_md5(monkeypatch: pytest.MonkeyPatch, tiny: Tiny) -> None:
    train_list, test_list, meta = cifar10_checksum_tables(tiny)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "test_list", test_list)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "meta", meta)


def write(name: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> Tiny:
    if name == "cifar10":
        tiny = write_cifar10(root, N_TRAIN, N_TEST)
        patch_cifar_md5(monkeypatch, tiny)
        return tiny
    return write_mnist(root, name, N_TRAIN, N_TEST)


def expected_image(name: str, raw: np.ndarray) -> torch.Tensor:
    """(p/255 - mean)/std per channel, CHW, from the uint8 pixels the test wrote."""
    mean, std = STATS[name]
    hwc = raw[..., None] if raw.ndim == 2 else raw
    chw = torch.from_numpy(hwc.astype(np.float64) / 255.0).permute(2, 0, 1)
    m, s = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (mean, std))
    return ((chw - m) / s).float()


def assert_one_line_error(err: pytest.ExceptionInfo[DTrainError], *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    return msg


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_build_datasets_reads_the_real_formats_normalised(name: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = write(name, tmp_path, monkeypatch)
    data = build_datasets(DataConfig(name=name, root=str(tmp_path)), seed=0)

    assert data.input_shape == SHAPES[name] and data.num_classes == 10
    assert (len(data.train), len(data.eval)) == (N_TRAIN, N_TEST)
    for ds, split in ((data.train, tiny.train), (data.eval, tiny.test)):
        assert [ds[i][1] for i in range(len(ds))] == split.labels.tolist()
        for i in (0, len(ds) - 1):
            x, _ = ds[i]
            assert x.shape == SHAPES[name] and x.dtype == torch.float32
            torch.testing.assert_close(x, expected_image(name, split.images[i]), rtol=0, atol=1e-5)
    # One pixel by hand: channel 0 of the first training image at row 3, column 5.
    p = int(tiny.train.images[0][3, 5] if name != "cifar10" else tiny.train.images[0][3, 5, 0])
    mean, std = STATS[name]
    assert data.train[0][0][0, 3, 5].item() == pytest.approx((p / 255 - mean[0]) / std[0], abs=1e-5)



def _same_bytes(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_decoded_vision_batches_equal_torchvisions_own_items(name: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """dtrain's MNIST/FashionMNIST/CIFAR-10 take the fast path; a batch equals torchvision's ToTensor + Normalize
    items, collated, bit for bit."""
    from torch.utils.data import default_collate
    from torchvision import transforms

    write(name, tmp_path, monkeypatch)
    data = build_datasets(DataConfig(name=name, root=str(tmp_path)), seed=0)
    mean, std = STATS[name]
    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
           "cifar10": torchvision.datasets.CIFAR10}[name]
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    for is_train, ours in ((True, data.train), (False, data.eval)):
        theirs = cls(str(tmp_path), train=is_train, transform=tf)
        idx = torch.randperm(len(theirs), generator=torch.Generator().manual_seed(0))[:13]
        want = default_collate([theirs[i] for i in idx.tolist()])
        _same_bytes(ours.get_batch(idx), want)
        _same_bytes(default_collate([ours[i] for i in idx.tolist()]), want)  # the DataLoader path, too
    ds = DistState("test", 0, 0, 2, "gloo", torch.device("cpu"))
    loaders = build_loaders(data, DataConfig(batch_size=8), seed=3, dist_state=ds, grad_accum_steps=1)
    assert isinstance(loaders.train.batches, TensorBatches) and isinstance(loaders.eval, TensorBatches)

def test_cifar10_md5_check_still_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = write("cifar10", tmp_path, monkeypatch)
    with (tiny.folder / "data_batch_3").open("ab") as f:
        f.write(b"\0")  # still a loadable pickle: only the md5 check can notice
    with pytest.raises(DTrainError) as err:
        vision_datasets("cifar10", str(tmp_path))
    msg = assert_one_line_error(err, "md5 mismatch: data_batch_3", "data.download")
    assert "data_batch_1" not in msg


def test_cifar10_real_md5_table_rejects_tiny_files(tmp_path: Path) -> None:
    # Unpatched, torchvision's own table must refuse files that are not the real CIFAR-10.
    write_cifar10(tmp_path, N_TRAIN, N_TEST)
    with pytest.raises(DTrainError) as err:
        vision_datasets("cifar10", str(tmp_path))
    assert_one_line_error(err, "md5 mismatch", "test_batch", "batches.meta")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_empty_root_says_where_and_how(name: str, tmp_path: Path) -> None:
    with pytest.raises(DTrainError) as err:
        vision_datasets(name, str(tmp_path))
    assert_one_line_error(err, str(tmp_path / FOLDERS[name]), "does not exist", "data.download=true",
                          CLASS_NAMES[name])


@pytest.mark.parametrize("name, lost", [("mnist", "t10k-labels-idx1-ubyte"),
                                        ("fashion_mnist", "train-images-idx3-ubyte"),
                                        ("cifar10", "test_batch")])
def test_missing_file_is_named(name: str, lost: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = write(name, tmp_path, monkeypatch)
    (tiny.folder / lost).unlink()
    with pytest.raises(DTrainError) as err:
        vision_datasets(name, str(tmp_path))
    msg = assert_one_line_error(err, f"missing {lost};", "data.download=true")
    assert "gunzip" not in msg


def test_gzipped_idx_files_get_a_gunzip_hint(tmp_path: Path) -> None:
    # What a manual download from the MNIST mirrors gives: torchvision 0.17+ reads only the extracted files.
    tiny = write_mnist(tmp_path, "mnist", N_TRAIN, N_TEST)
    raw = tiny.folder / "train-images-idx3-ubyte"
    (tiny.folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw.read_bytes()))
    raw.unlink()
    with pytest.raises(DTrainError) as err:
        vision_datasets("mnist", str(tmp_path))
    assert_one_line_error(err, "train-images-idx3-ubyte.gz: gunzip")


def test_truncated_idx_file_is_one_line(tmp_path: Path) -> None:
    tiny = write_mnist(tmp_path, "mnist", N_TRAIN, N_TEST)
    path = tiny.folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DTrainError) as err:
        vision_datasets("mnist", str(tmp_path))
    assert_one_line_error(err, "cannot be read", "data.download=true")


@pytest.mark.parametrize("name, module", [("mnist", torchvision.datasets.mnist),
                                          ("cifar10", torchvision.datasets.cifar)])
def test_failed_download_is_one_line(name: str, module: object, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("[Errno -3] Temporary failure in name resolution")

    # MNIST wraps this in a multi-line RuntimeError per mirror; CIFAR lets the URLError through.
    monkeypatch.setattr(module, "download_and_extract_archive", offline)
    with pytest.raises(DTrainError) as err:
        download_files(name, str(tmp_path))
    assert_one_line_error(err, f"downloading {CLASS_NAMES[name]}", "name resolution", "data.download=false")


def test_download_true_with_files_present_downloads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mnist(tmp_path, "mnist", N_TRAIN, N_TEST)

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("downloaded although every file was there")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", no_network)
    cfg = DataConfig(name="mnist", root=str(tmp_path), download=True)
    fetch_datasets(cfg, 0, SINGLE)
    data = build_datasets(cfg, seed=0)
    assert (len(data.train), len(data.eval)) == (N_TRAIN, N_TEST)


def test_without_torchvision_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now raises ImportError
    with pytest.raises(DTrainError) as err:
        vision_datasets("mnist", str(tmp_path))
    assert_one_line_error(err, "pip install 'dtrain[vision]'")


def check_run(out: Path, epochs: int) -> None:
    evals = records(out, "eval")
    assert [r["epoch"] for r in evals] == list(range(1, epochs + 1))
    assert all(r["samples"] == N_TEST and math.isfinite(r["loss"]) for r in evals)
    # Every training image once per epoch, summed over the ranks: none dropped, none repeated.
    assert [r["samples"] for r in records(out, "train_epoch")] == [N_TRAIN] * epochs


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_mnist_cli_end_to_end(tmp_path: Path) -> None:
    write_mnist(tmp_path / "data", "mnist", N_TRAIN, N_TEST)
    out = tmp_path / "run"
    result = dtrain(0, ["data.name=mnist", f"data.root={tmp_path / 'data'}", f"output_dir={out}",
                        "train.epochs=2", "model.hidden=[32]", *COMMON])
    check_run(out, epochs=2)
    assert f"on {N_TEST} samples" in result.stdout


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_fashion_mnist_two_processes_under_torchrun(tmp_path: Path) -> None:
    write_mnist(tmp_path / "data", "fashion_mnist", N_TRAIN, N_TEST)
    out = tmp_path / "run"
    dtrain(2, ["data.name=fashion_mnist", f"data.root={tmp_path / 'data'}", f"output_dir={out}",
               "train.epochs=1", "model.hidden=[32]", *COMMON])
    check_run(out, epochs=1)
    assert "world_size: 2" in (out / "config.yaml").read_text()


def test_cifar10_cnn_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process, so the md5 table patched here is the one torchvision checks.
    write("cifar10", tmp_path / "data", monkeypatch)
    out = tmp_path / "run"
    cfg = load_config(None, ["data.name=cifar10", f"data.root={tmp_path / 'data'}", f"output_dir={out}",
                             "model.name=cnn", "train.epochs=1", "optim.lr=0.01", *COMMON])
    final = train(cfg, environ={}).eval
    assert final is not None and final["samples"] == N_TEST
    check_run(out, epochs=1)


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_missing_files_exit_2_with_one_line(tmp_path: Path) -> None:
    result = dtrain(0, ["data.name=mnist", f"data.root={tmp_path / 'nothing'}", f"output_dir={tmp_path / 'run'}",
                        *COMMON], check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dtrain: error:") and "data.download=true" in lines[0]
    assert str(tmp_path / "nothing" / "MNIST" / "raw") in lines[0]


@pytest.mark.multiproc
@pytest.mark.timeout(180)
@pytest.mark.parametrize("storage", ["node-local", "shared"])
def test_download_once_per_file_system_on_two_nodes(tmp_path: Path, storage: str) -> None:
    """Two 'nodes' of one process each (RANK 0 and 1, LOCAL_RANK 0 on both), each in its own directory.

    A relative data.root is node-local storage (each node's own copy: two downloads);
    an absolute one is shared (one download, and the second node reads it).
    """
    import subprocess
    import sys as _sys

    from helpers import WORKERS, child_env, free_port

    log = tmp_path / "downloads.log"
    log.touch()
    root = "data" if storage == "node-local" else str(tmp_path / "shared")
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        env = child_env({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "DTRAIN_TEST_DOWNLOAD_LOG": str(log)})
        procs.append(subprocess.Popen(
            [_sys.executable, str(WORKERS / "download_node.py"), "data.name=mnist", "data.download=true",
             f"data.root={root}", "data.batch_size=8", "train.epochs=1", f"output_dir={tmp_path / 'run'}"],
            cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=150) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = sorted(log.read_text().splitlines())
    if storage == "shared":
        assert lines == [f"0 {tmp_path / 'shared'}"]
    else:
        assert lines == [f"0 {tmp_path / 'node0' / 'data'}", f"1 {tmp_path / 'node1' / 'data'}"]
    (ev,) = records(tmp_path / "run", "eval")
    assert ev["samples"] == 10
