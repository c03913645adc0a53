"""Tests of neurosim.datasets: MNIST/Fashion-MNIST IDX loading, checksums, structure checks,
the search order, CIFAR pickles. No test downloads anything: the online probe and the download
function are replaced for every test (the one test of the download mechanism itself copies a
local ``file://`` URL)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

import neurosim.datasets as D
from neurosim.datasets import Dataset, load_dataset
from neurosim.errors import DataError, ValidationError

from _tinyrun import MNIST as MNIST_DIR  # noqa: E402  ($NEUROSIM_DATA/mnist or ../shared/data/mnist)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX = D.IDX_FILES

needs_mnist = pytest.mark.skipif(
    not all((MNIST_DIR / (f + ".gz")).is_file() for f in IDX),
    reason=f"the genuine MNIST files are not in {MNIST_DIR}")
needs_fashion = pytest.mark.skipif(
    not all((FASHION_DIR / (f + ".gz")).is_file() for f in IDX),
    reason=f"Fashion-MNIST is not installed in {FASHION_DIR} (apt-get install dataset-fashion-mnist)")

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


class DownloadAttempted(AssertionError):
    pass


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No network, no real user cache, no NEUROSIM_DATA from the environment, no system dir."""
    calls = {"online": 0, "download": []}

    def offline(url, timeout=None):
        calls["online"] += 1
        return False

    def no_download(url, dest, sha256, **kw):
        calls["download"].append((url, dest))
        raise DownloadAttempted(f"a test tried to download {url}")

    monkeypatch.setattr(D, "_is_online", offline)
    monkeypatch.setattr(D, "_download", no_download)
    monkeypatch.setattr(D, "_user_cache_root", lambda: tmp_path / "user-cache")
    monkeypatch.delenv("NEUROSIM_DATA", raising=False)
    monkeypatch.delenv("NEUROSIM_NO_DOWNLOAD", raising=False)
    monkeypatch.setitem(D._SPECS, "fashion-mnist", dataclasses.replace(
        D._SPECS["fashion-mnist"], system_dirs=(tmp_path / "no-system-dir",)))
    # The in-process cache is keyed by each file's path, size, mtime and inode, so it is kept
    # across tests: the genuine MNIST is decoded once per test session.
    yield calls


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(directory: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, sha(p))
            for p in sorted(directory.iterdir())}


# ---------------------------------------------------------------------------------------------
# generated IDX files
# ---------------------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x800 | array.ndim
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.tobytes()


def make_idx(directory: Path, *, n_train=20, n_test=10, gz=False, seed=0, side=28,
             overrides: dict | None = None):
    """Write the four IDX files; return (arrays, checksums of what was written)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    arrays["train-images-idx3-ubyte"][0, 0, 0] = 255   # the extremes are present
    arrays["train-images-idx3-ubyte"][0, 0, 1] = 0
    directory.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name, arr in arrays.items():
        data = (overrides or {}).get(name) or idx_bytes(arr)
        fname = name + (".gz" if gz else "")
        if gz:
            data = gzip.compress(data, mtime=0)
        (directory / fname).write_bytes(data)
        sums[fname] = hashlib.sha256(data).hexdigest()
    return arrays, sums


# ---------------------------------------------------------------------------------------------
# the genuine MNIST
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_full():
    if not all((MNIST_DIR / (f + ".gz")).is_file() for f in IDX):
        pytest.skip(f"the genuine MNIST files are not in {MNIST_DIR}")
    return load_dataset("mnist", data_dir=MNIST_DIR)


@needs_mnist
def test_mnist_shapes_dtypes_range_counts(mnist_full):
    ds = mnist_full
    assert isinstance(ds, Dataset)
    assert ds.name == "mnist" and ds.n_classes == 10 and ds.verified
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.y_train.shape == (60000,)
    assert ds.y_test.dtype == np.int64 and ds.y_test.shape == (10000,)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert ds.x_test.min() == 0.0 and ds.x_test.max() == 1.0
    assert np.bincount(ds.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(ds.y_test).tolist() == MNIST_TEST_COUNTS
    assert ds.input_shape == (784,) and ds.image_shape == (28, 28)
    assert ds.source_dir == MNIST_DIR
    assert [p.name for p in ds.files] == [f + ".gz" for f in IDX]
    # values are k/255 exactly
    k = ds.x_train[:100] * 255
    assert np.array_equal(k, np.round(k))


@needs_mnist
def test_embedded_mnist_sums_match_shipped_sums():
    for line in (MNIST_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert D.canonical_checksums("mnist")[name] == digest
    for line in (MNIST_DIR / "MD5SUMS").read_text().splitlines():
        digest, name = line.split()
        assert D._MNIST_MD5[name] == digest


@needs_mnist
def test_mnist_train_limit_flatten_and_cache(mnist_full, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again instead of using the in-process cache")

    monkeypatch.setattr(D, "_load_idx", no_decode)
    ds = load_dataset("mnist", data_dir=MNIST_DIR, train_limit=100, flatten=False)
    assert ds.x_train.shape == (100, 28, 28) and ds.y_train.shape == (100,)
    assert ds.x_test.shape == (10000, 28, 28) and ds.input_shape == (28, 28)
    assert np.array_equal(ds.x_train.reshape(100, 784), mnist_full.x_train[:100])
    assert np.array_equal(ds.y_train, mnist_full.y_train[:100])
    # the caller owns its arrays: mutating them does not touch the cache
    ds.x_test[:] = 7.0
    ds.y_test[:] = 3
    again = load_dataset("mnist", data_dir=MNIST_DIR, train_limit=100)
    assert np.array_equal(again.x_test, mnist_full.x_test)
    assert np.array_equal(again.y_test, mnist_full.y_test)


@needs_mnist
def test_neurosim_data_root_with_symlink(tmp_path, monkeypatch, mnist_full):
    empty, root = tmp_path / "empty-root", tmp_path / "root"
    empty.mkdir()
    root.mkdir()
    (root / "mnist").symlink_to(MNIST_DIR, target_is_directory=True)
    monkeypatch.setenv("NEUROSIM_DATA", os.pathsep.join([str(empty), str(root)]))
    ds = load_dataset("mnist", train_limit=10)
    assert ds.source_dir == root / "mnist"
    assert np.array_equal(ds.y_train, mnist_full.y_train[:10])
    assert D.search_locations("mnist")[:2] == [empty / "mnist", root / "mnist"]


@needs_mnist
def test_mnist_raw_uncompressed_files(tmp_path, mnist_full):
    raw = tmp_path / "raw"
    raw.mkdir()
    for f in IDX:
        (raw / f).write_bytes(gzip.decompress((MNIST_DIR / (f + ".gz")).read_bytes()))
    ds = load_dataset("mnist", data_dir=raw)          # verified against the content sums
    assert [p.name for p in ds.files] == list(IDX)
    assert np.array_equal(ds.x_test, mnist_full.x_test)
    assert np.array_equal(ds.y_train, mnist_full.y_train)


@needs_mnist
def test_recompressed_gzip_accepted_by_content_sum(tmp_path, mnist_full):
    """A .gz with other bytes but canonical content (as Debian ships Fashion-MNIST) passes."""
    d = tmp_path / "regz"
    d.mkdir()
    for f in IDX:
        src = MNIST_DIR / (f + ".gz")
        if f == "t10k-labels-idx1-ubyte":
            (d / src.name).write_bytes(gzip.compress(gzip.decompress(src.read_bytes()),
                                                     compresslevel=1, mtime=0))
            assert sha(d / src.name) != D._MNIST_SHA256[src.name]
        else:
            (d / src.name).symlink_to(src)
    ds = load_dataset("mnist", data_dir=d)
    assert np.array_equal(ds.y_test, mnist_full.y_test)


def _copy_mnist(dst: Path) -> Path:
    dst.mkdir()
    for f in IDX:
        shutil.copyfile(MNIST_DIR / (f + ".gz"), dst / (f + ".gz"))
    return dst


@needs_mnist
def test_flipped_byte_is_named_and_nothing_modified(tmp_path):
    d = _copy_mnist(tmp_path / "flip")
    target = d / "train-labels-idx1-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    before = snapshot(d)
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", data_dir=d)
    msg = str(exc.value)
    assert exc.value.where == "mnist/train-labels-idx1-ubyte.gz"
    assert str(target) in msg and "does not match the canonical" in msg
    assert D._MNIST_SHA256["train-labels-idx1-ubyte.gz"][:16] in msg
    assert hashlib.sha256(bytes(data)).hexdigest()[:16] in msg
    assert "download it again" in msg
    assert snapshot(d) == before
    # without checksums, gzip's CRC still catches it
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("mnist", data_dir=d, verify=False)
    assert snapshot(d) == before


@needs_mnist
def test_truncated_file_is_named_and_nothing_modified(tmp_path):
    d = _copy_mnist(tmp_path / "trunc")
    target = d / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    before = snapshot(d)
    with pytest.raises(DataError, match="corrupt or truncated") as exc:
        load_dataset("mnist", data_dir=d)
    assert exc.value.where == "mnist/t10k-images-idx3-ubyte.gz" and str(target) in str(exc.value)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz.*truncated"):
        load_dataset("mnist", data_dir=d, verify=False)
    assert snapshot(d) == before


# ---------------------------------------------------------------------------------------------
# generated IDX files: formats and structure errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_generated_idx_with_checksum_override(tmp_path, gz):
    arrays, sums = make_idx(tmp_path / "gen", gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path / "gen", checksums=sums)
    assert ds.x_train.shape == (20, 784) and ds.x_test.shape == (10, 784)
    expect = arrays["train-images-idx3-ubyte"].reshape(20, 784).astype(np.float32) / 255
    assert np.array_equal(ds.x_train, expect)
    assert np.array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"].astype(np.int64))
    assert ds.x_train.max() == 1.0 and ds.x_train.min() == 0.0
    # without the override the embedded canonical sums reject the generated files
    with pytest.raises(DataError, match="does not match the canonical"):
        load_dataset("mnist", data_dir=tmp_path / "gen")


def test_generated_idx_verify_false(tmp_path):
    make_idx(tmp_path / "gen")
    ds = load_dataset("mnist", data_dir=tmp_path / "gen", verify=False)
    assert ds.n_train == 20 and not ds.verified


@pytest.mark.parametrize("case, pattern", [
    ("swapped", r"magic number 0x00000801 \(that of an IDX label file\); expected 0x00000803"),
    ("truncated", r"announces 20 images.*truncated"),
    ("trailing", r"bytes after the 10 labels"),
    ("label_range", r"label 10 .*expected labels 0\.\.9"),
    ("count", r"holds 20 images but .* holds 19 labels"),
    ("dims", r"images of 27x27 pixels; expected 28x28"),
    ("empty", r"too short for an IDX header"),
])
def test_idx_structure_errors(tmp_path, case, pattern):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 20, dtype=np.uint8)
    overrides = {
        "swapped": {"train-images-idx3-ubyte": idx_bytes(labels)},
        "truncated": {"train-images-idx3-ubyte": idx_bytes(imgs)[:-5]},
        "trailing": {"t10k-labels-idx1-ubyte": idx_bytes(labels[:10]) + b"\0\0"},
        "label_range": {"train-labels-idx1-ubyte": idx_bytes(np.r_[labels[:19], 10])},
        "count": {"train-labels-idx1-ubyte": idx_bytes(labels[:19])},
        "dims": {"train-images-idx3-ubyte": idx_bytes(imgs[:, :27, :27])},
        "empty": {"t10k-images-idx3-ubyte": b"\0\0"},
    }[case]
    d = tmp_path / case
    make_idx(d, overrides=overrides)
    before = snapshot(d)
    with pytest.raises(DataError, match=pattern) as exc:
        load_dataset("mnist", data_dir=d, verify=False)
    assert exc.value.where.startswith("mnist/")
    assert str(d) in str(exc.value)
    assert snapshot(d) == before


# ---------------------------------------------------------------------------------------------
# search order, missing files, downloads
# ---------------------------------------------------------------------------------------------

def test_missing_files_list_every_place_searched(tmp_path, monkeypatch, isolated):
    root = tmp_path / "data-root"
    root.mkdir()
    monkeypatch.setenv("NEUROSIM_DATA", str(root))
    with pytest.raises(DataError) as exc:
        load_dataset("mnist")
    msg = str(exc.value)
    assert exc.value.where == "mnist"
    assert f"$NEUROSIM_DATA {root / 'mnist'}: does not exist" in msg
    assert f"user cache {tmp_path / 'user-cache' / 'mnist'}: does not exist" in msg
    assert "offline" in msg and "did not answer within" in msg
    assert "--data DIR" in msg and "NEUROSIM_DATA" in msg
    for f in IDX:
        assert f + ".gz" in msg
    assert isolated["online"] == 1 and isolated["download"] == []


def test_missing_with_env_unset_and_download_disabled(monkeypatch, isolated):
    monkeypatch.setenv("NEUROSIM_NO_DOWNLOAD", "1")
    with pytest.raises(DataError) as exc:
        load_dataset("fashion-mnist")
    msg = str(exc.value)
    assert "$NEUROSIM_DATA: not set" in msg and "no-system-dir" in msg
    assert "NEUROSIM_NO_DOWNLOAD" in msg and "dataset-fashion-mnist" in msg
    assert isolated["online"] == 0 and isolated["download"] == []
    with pytest.raises(DataError, match=r"download=False"):
        load_dataset("mnist", download=False)


def test_partial_folder_reports_missing_files(tmp_path):
    d = tmp_path / "partial"
    make_idx(d)
    (d / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"incomplete: lacks t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("mnist", data_dir=d, verify=False)


def test_explicit_data_dir_is_never_downloaded_into(tmp_path, monkeypatch, isolated):
    monkeypatch.setattr(D, "_is_online", lambda url, timeout=None: True)
    with pytest.raises(DataError, match=r"data_dir .*nowhere: does not exist") as exc:
        load_dataset("mnist", data_dir=tmp_path / "nowhere")
    assert "--data DIR" in str(exc.value)
    assert isolated["download"] == []
    assert not (tmp_path / "nowhere").exists()


def test_user_cache_is_searched(tmp_path):
    arrays, sums = make_idx(tmp_path / "user-cache" / "mnist", gz=True)
    ds = load_dataset("mnist", checksums=sums)
    assert ds.source_dir == tmp_path / "user-cache" / "mnist"


def test_env_wins_over_cache(tmp_path, monkeypatch):
    make_idx(tmp_path / "user-cache" / "mnist", n_train=5)
    make_idx(tmp_path / "root" / "mnist", n_train=7)
    monkeypatch.setenv("NEUROSIM_DATA", str(tmp_path / "root"))
    assert load_dataset("mnist", verify=False).n_train == 7


def test_download_flow_goes_to_cache_when_online(tmp_path, monkeypatch):
    """The resolution falls back to a download into the cache; the transfer itself is faked."""
    src = tmp_path / "server"
    arrays, sums = make_idx(src, gz=True)
    fetched = []

    def fake_download(url, dest, sha256, **kw):
        fetched.append((url, dest, sha256))
        shutil.copyfile(src / Path(url).name, dest)
        return dest

    (tmp_path / "user-cache" / "mnist").mkdir(parents=True)
    monkeypatch.setattr(D, "_is_online", lambda url, timeout=None: True)
    monkeypatch.setattr(D, "_download", fake_download)
    ds = load_dataset("mnist", checksums=sums)
    assert ds.source_dir == tmp_path / "user-cache" / "mnist"
    assert [d.name for _, d, _ in fetched] == [f + ".gz" for f in IDX]
    assert all(h == D._MNIST_SHA256[d.name] for _, d, h in fetched)   # canonical sums
    assert np.array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])


def test_download_is_atomic_and_checked(tmp_path):
    """The real _download, on a local file:// URL (no network): temp file + rename."""
    payload = b"hello neurosim" * 1000
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    dest_dir = tmp_path / "cache"
    good = hashlib.sha256(payload).hexdigest()
    _ORIGINAL_DOWNLOAD(src.as_uri(), dest_dir / "file.gz", good)
    assert (dest_dir / "file.gz").read_bytes() == payload
    assert sorted(p.name for p in dest_dir.iterdir()) == ["file.gz"]
    with pytest.raises(DataError, match="discarded"):
        _ORIGINAL_DOWNLOAD(src.as_uri(), dest_dir / "other.gz", "0" * 64)
    assert sorted(p.name for p in dest_dir.iterdir()) == ["file.gz"]      # no leftovers
    with pytest.raises(OSError):
        _ORIGINAL_DOWNLOAD((tmp_path / "absent").as_uri(), dest_dir / "x.gz", None)
    assert sorted(p.name for p in dest_dir.iterdir()) == ["file.gz"]


_ORIGINAL_DOWNLOAD = D._download      # saved at import, before any monkeypatching


# ---------------------------------------------------------------------------------------------
# argument validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "10", 21])
def test_bad_train_limit(tmp_path, limit):
    make_idx(tmp_path / "gen")
    with pytest.raises(ValidationError, match="train_limit") as exc:
        load_dataset("mnist", data_dir=tmp_path / "gen", verify=False, train_limit=limit)
    if limit == 21:
        assert "expected 1..20" in str(exc.value)


def test_train_limit_numpy_int_ok(tmp_path):
    make_idx(tmp_path / "gen")
    ds = load_dataset("mnist", data_dir=tmp_path / "gen", verify=False,
                      train_limit=np.int64(20))
    assert ds.n_train == 20


def test_bad_arguments(tmp_path):
    with pytest.raises(ValidationError, match="unknown data set 'svhn'"):
        load_dataset("svhn")
    make_idx(tmp_path / "gen")
    with pytest.raises(ValidationError, match="unknown file name"):
        load_dataset("mnist", data_dir=tmp_path / "gen", checksums={"train.gz": "0" * 64})
    with pytest.raises(ValidationError, match="64 hex digits"):
        load_dataset("mnist", data_dir=tmp_path / "gen",
                     checksums={"train-images-idx3-ubyte": "abc"})
    with pytest.raises(ValidationError, match="coarse labels exist only for CIFAR-100"):
        load_dataset("mnist", data_dir=tmp_path / "gen", label_mode="coarse")


def test_aliases():
    assert D._spec("fashion_mnist").name == "fashion-mnist"
    assert D._spec("CIFAR10").name == "cifar-10" and D._spec("cifar-10").name == "cifar-10"
    assert D._spec("cifar100").name == "cifar-100"
    assert D.available_datasets() == ("mnist", "fashion-mnist", "cifar-10", "cifar-100")


def test_no_network_on_import():
    import subprocess
    import sys
    code = ("import socket\n"
            "def boom(*a, **k): raise SystemExit('network used on import')\n"
            "socket.create_connection = boom\nsocket.socket.connect = boom\n"
            "import neurosim.datasets\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# ---------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------

def cifar_batch(n, rng, label_keys, protocol):
    batch = {"batch_label": "testing batch", "data": rng.integers(0, 256, (n, 3072), np.uint8),
             "filenames": [f"img_{i}.png" for i in range(n)]}
    for key, k in label_keys.items():
        batch[key] = [int(v) for v in rng.integers(0, k, n)]
    return pickle.dumps(batch, protocol=protocol)


def make_cifar10(parent: Path, n=4, n_test=3, protocol=2, inner=True):
    rng = np.random.default_rng(5)
    d = parent / "cifar-10-batches-py" if inner else parent
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (d / name).write_bytes(cifar_batch(n, rng, {"labels": 10}, protocol))
    (d / "test_batch").write_bytes(cifar_batch(n_test, rng, {"labels": 10}, protocol))
    (d / "batches.meta").write_bytes(pickle.dumps(
        {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, protocol=protocol))
    return d


def make_cifar100(parent: Path, n=6, n_test=4, protocol=5):
    rng = np.random.default_rng(6)
    d = parent / "cifar-100-python"
    d.mkdir(parents=True)
    keys = {"fine_labels": 100, "coarse_labels": 20}
    (d / "train").write_bytes(cifar_batch(n, rng, keys, protocol))
    (d / "test").write_bytes(cifar_batch(n_test, rng, keys, protocol))
    (d / "meta").write_bytes(pickle.dumps(
        {"fine_label_names": [f"f{i}" for i in range(100)],
         "coarse_label_names": [f"k{i}" for i in range(20)]}, protocol=protocol))
    return d


def read_batch(path):
    return pickle.loads(Path(path).read_bytes())


def test_cifar10_from_parent_and_from_dir(tmp_path):
    d = make_cifar10(tmp_path / "c10")
    for where in (tmp_path / "c10", d):
        ds = load_dataset("cifar10", data_dir=where)
        assert ds.name == "cifar-10" and ds.n_classes == 10 and ds.source_dir == d
        assert ds.x_train.shape == (20, 3072) and ds.x_test.shape == (3, 3072)
        assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
        assert ds.class_names == tuple(f"c{i}" for i in range(10))
    b1 = read_batch(d / "data_batch_1")
    assert np.array_equal(ds.x_train[:4], b1["data"].astype(np.float32) / 255)
    assert ds.y_train[:4].tolist() == b1["labels"]
    assert ds.y_test.tolist() == read_batch(d / "test_batch")["labels"]
    img = load_dataset("cifar-10", data_dir=d, flatten=False, train_limit=2)
    assert img.x_train.shape == (2, 3, 32, 32) and img.input_shape == (3, 32, 32)
    # channel-major as stored: the first 1024 values are the red plane
    assert np.array_equal(img.x_train[0, 0].ravel(), ds.x_train[0, :1024])


def test_cifar10_via_neurosim_data(tmp_path, monkeypatch):
    make_cifar10(tmp_path / "root" / "cifar-10")
    monkeypatch.setenv("NEUROSIM_DATA", str(tmp_path / "root"))
    ds = load_dataset("cifar-10")
    assert ds.source_dir == tmp_path / "root" / "cifar-10" / "cifar-10-batches-py"


def test_cifar100_fine_and_coarse(tmp_path):
    d = make_cifar100(tmp_path / "c100")
    tr = read_batch(d / "train")
    fine = load_dataset("cifar100", data_dir=tmp_path / "c100")
    assert fine.name == "cifar-100" and fine.n_classes == 100
    assert fine.x_train.shape == (6, 3072) and fine.x_test.shape == (4, 3072)
    assert fine.y_train.tolist() == tr["fine_labels"]
    assert fine.class_names[:2] == ("f0", "f1")
    coarse = load_dataset("cifar-100", data_dir=d, label_mode="coarse")
    assert coarse.n_classes == 20 and coarse.y_train.tolist() == tr["coarse_labels"]
    assert coarse.class_names[:2] == ("k0", "k1")
    assert np.array_equal(coarse.x_train, fine.x_train)


def test_cifar_tarball(tmp_path):
    src = make_cifar10(tmp_path / "src")
    out = tmp_path / "tar"
    out.mkdir()
    tar_path = out / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match="does not match the canonical 6d958be074577803"):
        load_dataset("cifar10", data_dir=out)
    ds = load_dataset("cifar10", data_dir=out, checksums={tar_path.name: sha(tar_path)})
    assert ds.x_train.shape == (20, 3072) and ds.source_dir == out
    assert ds.files == (tar_path,)
    assert load_dataset("cifar10", data_dir=out, verify=False).n_train == 20
    assert sorted(p.name for p in out.iterdir()) == [tar_path.name]     # nothing extracted


def test_cifar_batch_checksum_override(tmp_path):
    d = make_cifar10(tmp_path / "c10")
    with pytest.raises(DataError, match=r"cifar-10/data_batch_3: SHA-256"):
        load_dataset("cifar10", data_dir=d, checksums={"data_batch_3": "0" * 64})
    ok = load_dataset("cifar10", data_dir=d, checksums={"data_batch_3": sha(d / "data_batch_3")})
    assert ok.n_train == 20


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("case, pattern", [
    ("shape", r"'data' is a uint8 array of shape \(4, 3071\); expected a uint8 array of shape "
              r"\(n, 3072\)"),
    ("dtype", r"'data' is a float64 array"),
    ("missing_key", r"lacks key\(s\) 'labels'"),
    ("label_range", r"'labels' ranges over 0\.\.10; expected 0\.\.9"),
    ("label_count", r"'labels' holds 3 values .* expected 4 integer labels"),
    ("not_dict", r"holds a list; expected a dict"),
    ("truncated", r"not a readable CIFAR python batch"),
    ("evil", r"refusing to load global (posix|os|nt)\.system"),
])
def test_cifar_structure_errors(tmp_path, monkeypatch, case, pattern):
    d = make_cifar10(tmp_path / "c10")
    target = d / "data_batch_2"
    b = read_batch(target)
    if case == "shape":
        b["data"] = b["data"][:, :3071]
    elif case == "dtype":
        b["data"] = b["data"].astype(np.float64)
    elif case == "missing_key":
        del b["labels"]
    elif case == "label_range":
        b["labels"] = [0, 1, 2, 10]
    elif case == "label_count":
        b["labels"] = b["labels"][:3]
    elif case == "not_dict":
        b = [1, 2]
    elif case == "evil":
        b = {"data": _Evil()}
    data = target.read_bytes()[:100] if case == "truncated" else pickle.dumps(b, protocol=2)
    target.write_bytes(data)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=pattern) as exc:
        load_dataset("cifar10", data_dir=d)
    assert exc.value.where == "cifar-10/data_batch_2" and str(target) in str(exc.value)
    assert not (tmp_path / "PWNED").exists()


def test_cifar100_missing_coarse_key(tmp_path):
    d = make_cifar100(tmp_path / "c100")
    b = read_batch(d / "test")
    del b["coarse_labels"]
    (d / "test").write_bytes(pickle.dumps(b))
    with pytest.raises(DataError, match=r"cifar-100/test: .*lacks key\(s\) 'coarse_labels'"):
        load_dataset("cifar100", data_dir=d)


def test_cifar_missing_lists_places(tmp_path):
    d = make_cifar10(tmp_path / "c10")
    (d / "test_batch").unlink()
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", data_dir=tmp_path / "c10")
    msg = str(exc.value)
    assert "incomplete" in msg and "lacks test_batch" in msg
    assert "cifar-10-python.tar.gz" in msg and "--data DIR" in msg


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST from Debian's dataset-fashion-mnist
# ---------------------------------------------------------------------------------------------

@needs_fashion
def test_fashion_mnist_from_system_dir(monkeypatch):
    monkeypatch.setitem(D._SPECS, "fashion-mnist", dataclasses.replace(
        D._SPECS["fashion-mnist"], system_dirs=(FASHION_DIR,)))
    ds = load_dataset("fashion_mnist")
    assert ds.name == "fashion-mnist" and ds.source_dir == FASHION_DIR and ds.verified
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"


def test_cache_follows_file_changes_and_clear_cache(tmp_path, monkeypatch):
    d = tmp_path / "gen"
    _, sums = make_idx(d, seed=1)
    first = load_dataset("mnist", data_dir=d, checksums=sums)
    calls = []
    real = D._load_idx
    monkeypatch.setattr(D, "_load_idx", lambda *a: calls.append(1) or real(*a))
    load_dataset("mnist", data_dir=d, checksums=sums)
    load_dataset("mnist", data_dir=d, checksums=sums, verify=False)    # a verified entry serves
    assert calls == []
    D.clear_cache()
    load_dataset("mnist", data_dir=d, checksums=sums)
    assert calls == [1]
    arrays, sums2 = make_idx(d, seed=2, n_train=21)                      # files replaced
    again = load_dataset("mnist", data_dir=d, checksums=sums2)
    assert calls == [1, 1] and again.n_train == 21
    assert not np.array_equal(again.x_test, first.x_test)
