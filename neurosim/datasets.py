"""Dataset loaders: MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100.

One entry point, :func:`load_dataset`, returns a :class:`Dataset` with float32 inputs scaled to
``[0, 1]`` and int64 labels::

    from neurosim.datasets import load_dataset
    ds = load_dataset("mnist")
    ds.x_train.shape   # (60000, 784)

Where the files are looked up, in order (the first place that holds a complete copy wins):

1. ``data_dir`` when it is given (the folder holding the dataset's own files; nothing else is
   searched then and nothing is downloaded);
2. ``$NEUROSIM_DATA/<folder>``, where ``NEUROSIM_DATA`` names a root with one folder per dataset
   (``mnist/``, ``fashion-mnist/``, ``cifar-10/``, ``cifar-100/``; several roots may be joined
   with ``os.pathsep``);
3. for Fashion-MNIST, ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``);
4. the user cache, ``platformdirs.user_cache_dir("neurosim")/<folder>``;
5. a download into that cache, only when the download host answers within a few seconds (and
   neither ``download=False`` nor ``NEUROSIM_NO_DOWNLOAD=1`` forbids it). Downloads go to a
   temporary file in the cache folder, are checked against the embedded SHA-256 and only then
   renamed into place, so no half-written file is ever left behind.

Otherwise a :class:`~neurosim.errors.DataError` lists every place searched and says which files to
put where. Nothing is read from the network on import, and the loaders never write anywhere but
the user cache.

Every file is checked (``verify=True``) against the SHA-256 of the canonical distribution. A
gzip file whose own bytes differ from the canonical ``.gz`` (re-compressed, or with a normalized
gzip header as Debian ships Fashion-MNIST) is accepted when its decompressed content has the
canonical SHA-256; an uncompressed IDX file is checked the same way. The structure is always
validated (IDX magic numbers, dimensions, truncation, label ranges, image/label counts; CIFAR
pickle keys, shapes, dtypes and label ranges).

Decoded arrays are kept in memory per (files, ``verify``, ``checksums``) for the life of the
process, so loading the same data set again costs only the float conversion; see
:func:`clear_cache`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import operator
import os
import pickle
import socket
import struct
import tarfile
import tempfile
import threading
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurosim.errors import DataError, ValidationError

__all__ = [
    "Dataset",
    "load_dataset",
    "clear_cache",
    "available_datasets",
    "search_locations",
    "canonical_checksums",
    "ENV_DATA",
    "ENV_NO_DOWNLOAD",
]

#: Environment variable naming a root folder with one sub-folder per data set.
ENV_DATA = "NEUROSIM_DATA"
#: Set to ``1`` (or ``true``/``yes``) to forbid downloads.
ENV_NO_DOWNLOAD = "NEUROSIM_NO_DOWNLOAD"

#: Seconds to wait for the download host before declaring the machine offline.
ONLINE_PROBE_TIMEOUT_S = 3.0
#: Socket timeout of an individual download.
DOWNLOAD_TIMEOUT_S = 60.0

# ---------------------------------------------------------------------------------------------
# Canonical files and their checksums
# ---------------------------------------------------------------------------------------------

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# SHA-256 of the canonical .gz files and of their decompressed IDX content. The .gz sums of
# MNIST match the SHA256SUMS distributed with the genuine files, which also match the official
# MD5s.
_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# Fashion-MNIST (Zalando). The .gz SHA-256 are those of the files published on the project's
# download server (their MD5s are the ones in the project's README); the content sums are of the
# decompressed IDX files. Debian's dataset-fashion-mnist ships the same deflate streams with a
# normalized gzip header (no file name, build-date mtime), so its .gz bytes differ while the
# content sums match.
_FASHION_SHA256 = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
_FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

_CIFAR10_SHA256 = {
    "cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
}
_CIFAR10_MD5 = {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}
_CIFAR100_SHA256 = {
    "cifar-100-python.tar.gz": "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
}
_CIFAR100_MD5 = {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}

_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot")
_CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                    "ship", "truck")


@dataclass(frozen=True)
class _Spec:
    name: str                      # canonical name, also the folder under NEUROSIM_DATA/cache
    title: str                     # for messages
    kind: str                      # "idx" or "cifar"
    n_classes: int
    image_shape: tuple[int, ...]
    sha256: Mapping[str, str]
    md5: Mapping[str, str]
    urls: tuple[str, ...]          # idx: base URLs (mirrors); cifar: tarball URLs
    system_dirs: tuple[Path, ...] = ()
    class_names: tuple[str, ...] | None = None
    # CIFAR only
    inner_dir: str = ""            # folder inside the tarball
    tarball: str = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    meta_file: str = ""

    @property
    def required_files(self) -> tuple[str, ...]:
        if self.kind == "idx":
            return IDX_FILES
        return self.train_files + self.test_files

    @property
    def known_names(self) -> set[str]:
        """File names accepted as keys of a ``checksums`` override."""
        if self.kind == "idx":
            return set(IDX_FILES) | {f + ".gz" for f in IDX_FILES}
        return set(self.required_files) | {self.tarball, self.meta_file}


_SPECS: dict[str, _Spec] = {
    "mnist": _Spec(
        name="mnist", title="MNIST", kind="idx", n_classes=10, image_shape=(28, 28),
        sha256=_MNIST_SHA256, md5=_MNIST_MD5,
        urls=("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/",
              "http://yann.lecun.com/exdb/mnist/"),
        class_names=tuple(str(i) for i in range(10)),
    ),
    "fashion-mnist": _Spec(
        name="fashion-mnist", title="Fashion-MNIST", kind="idx", n_classes=10,
        image_shape=(28, 28), sha256=_FASHION_SHA256, md5=_FASHION_MD5,
        urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
        class_names=_FASHION_CLASSES,
    ),
    "cifar-10": _Spec(
        name="cifar-10", title="CIFAR-10", kind="cifar", n_classes=10, image_shape=(3, 32, 32),
        sha256=_CIFAR10_SHA256, md5=_CIFAR10_MD5,
        urls=("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
        class_names=_CIFAR10_CLASSES,
        inner_dir="cifar-10-batches-py", tarball="cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta",
    ),
    "cifar-100": _Spec(
        name="cifar-100", title="CIFAR-100", kind="cifar", n_classes=100,
        image_shape=(3, 32, 32), sha256=_CIFAR100_SHA256, md5=_CIFAR100_MD5,
        urls=("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
        inner_dir="cifar-100-python", tarball="cifar-100-python.tar.gz",
        train_files=("train",), test_files=("test",), meta_file="meta",
    ),
}

_ALIASES = {
    "mnist": "mnist",
    "fashion-mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
    "cifar10": "cifar-10", "cifar-10": "cifar-10",
    "cifar100": "cifar-100", "cifar-100": "cifar-100",
}


def available_datasets() -> tuple[str, ...]:
    """Return the canonical names of the data sets :func:`load_dataset` knows.

    Returns
    -------
    tuple of str
        ``("mnist", "fashion-mnist", "cifar-10", "cifar-100")``.
    """
    return tuple(_SPECS)


def canonical_checksums(name: str) -> dict[str, str]:
    """Return the embedded SHA-256 sums of a data set's canonical files.

    Parameters
    ----------
    name
        A data set name or alias (see :func:`load_dataset`).

    Returns
    -------
    dict
        File name to lower-case hex SHA-256. For MNIST and Fashion-MNIST both the ``.gz`` files
        and their decompressed IDX content are listed; for CIFAR the python-format tarball.
    """
    return dict(_spec(name).sha256)


def _spec(name: str) -> _Spec:
    if not isinstance(name, str):
        raise ValidationError("load_dataset.name", f"got {name!r} ({type(name).__name__}); "
                              "expected a data set name (str).",
                              f"use one of {', '.join(_SPECS)}.")
    key = name.strip().lower().replace("_", "-")
    if key not in _ALIASES:
        raise ValidationError("load_dataset.name", f"unknown data set {name!r}; expected one of "
                              f"{', '.join(_SPECS)} (aliases: fashion_mnist, cifar10, cifar100).",
                              "check the spelling.")
    return _SPECS[_ALIASES[key]]


# ---------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A loaded data set: training and test arrays plus where they came from.

    Attributes
    ----------
    name : str
        Canonical name: ``"mnist"``, ``"fashion-mnist"``, ``"cifar-10"`` or ``"cifar-100"``.
    x_train, x_test : numpy.ndarray
        float32 inputs scaled to ``[0, 1]``. Flattened: ``(n, 784)`` for (Fashion-)MNIST,
        ``(n, 3072)`` for CIFAR, channel-major as stored (1024 red, then green, then blue
        values, each row-major). Not flattened: ``(n, 28, 28)`` or ``(n, 3, 32, 32)``. The arrays
        belong to the caller (a fresh copy on every call).
    y_train, y_test : numpy.ndarray
        int64 labels, ``(n,)``, in ``range(n_classes)``.
    n_classes : int
        10 (MNIST, Fashion-MNIST, CIFAR-10), 100 (CIFAR-100 fine labels) or 20 (CIFAR-100
        coarse labels).
    source_dir : pathlib.Path
        The folder the files were read from (for a CIFAR tarball, the folder holding it).
    input_shape : tuple of int
        Shape of one input, ``x_train.shape[1:]``.
    image_shape : tuple of int
        Shape of one image: ``(28, 28)`` or ``(3, 32, 32)``.
    class_names : tuple of str or None
        Human-readable class names, when known.
    files : tuple of pathlib.Path
        The files that were read.
    verified : bool
        Whether checksums were verified.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    source_dir: Path
    input_shape: tuple[int, ...]
    image_shape: tuple[int, ...]
    class_names: tuple[str, ...] | None = None
    files: tuple[Path, ...] = field(default=())
    verified: bool = True

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, n_train={self.n_train}, n_test={self.n_test}, "
                f"input_shape={self.input_shape}, n_classes={self.n_classes}, "
                f"source_dir={str(self.source_dir)!r})")


# ---------------------------------------------------------------------------------------------
# Where the files are
# ---------------------------------------------------------------------------------------------

@dataclass
class _Source:
    """A complete copy of a data set's files."""

    kind: str                      # "idx", "cifar-dir" or "cifar-tar"
    directory: Path
    files: dict[str, Path]         # logical name -> path (cifar-tar: {"tarball": path})


@dataclass
class _Searched:
    label: str
    path: Path | None
    state: str                     # human-readable outcome


def _user_cache_root() -> Path:
    try:
        import platformdirs
    except ImportError:  # pragma: no cover - platformdirs is a declared dependency
        return Path.home() / ".cache" / "neurosim"
    return Path(platformdirs.user_cache_dir("neurosim"))


def _cache_dir(spec: _Spec) -> Path:
    return _user_cache_root() / spec.name


def _env_roots() -> list[Path]:
    value = os.environ.get(ENV_DATA, "")
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]


def _locations(spec: _Spec, data_dir) -> list[tuple[str, Path]]:
    if data_dir is not None:
        return [("data_dir", Path(data_dir).expanduser())]
    out = [(f"${ENV_DATA}", root / spec.name) for root in _env_roots()]
    out += [("system package", d) for d in spec.system_dirs]
    out.append(("user cache", _cache_dir(spec)))
    return out


def search_locations(name: str, data_dir=None) -> list[Path]:
    """Return the folders :func:`load_dataset` searches for a data set, in order.

    Parameters
    ----------
    name
        Data set name or alias.
    data_dir
        As for :func:`load_dataset`; when given it is the only place searched.

    Returns
    -------
    list of pathlib.Path
        The folders, whether or not they exist (the download target is the last one, the
        user cache).
    """
    return [p for _, p in _locations(_spec(name), data_dir)]


def _find_idx(directory: Path) -> tuple[dict[str, Path], list[str]]:
    found, missing = {}, []
    for base in IDX_FILES:
        for candidate in (directory / (base + ".gz"), directory / base):
            if candidate.is_file():
                found[base] = candidate
                break
        else:
            missing.append(base)
    return found, missing


def _find_cifar(spec: _Spec, directory: Path) -> tuple[_Source | None, str]:
    """Look for CIFAR batches in ``directory`` or its ``inner_dir``, or the tarball."""
    partial = ""
    for folder in (directory / spec.inner_dir, directory):
        present = {f: folder / f for f in spec.required_files if (folder / f).is_file()}
        if len(present) == len(spec.required_files):
            meta = folder / spec.meta_file
            if meta.is_file():
                present[spec.meta_file] = meta
            return _Source("cifar-dir", folder, present), ""
        if present and not partial:
            missing = [f for f in spec.required_files if f not in present]
            partial = f"incomplete: {folder} lacks {', '.join(missing)}"
    tar = directory / spec.tarball
    if tar.is_file():
        return _Source("cifar-tar", directory, {"tarball": tar}), ""
    return None, partial


def _probe(spec: _Spec, directory: Path) -> tuple[_Source | None, str]:
    if not directory.exists():
        return None, "does not exist"
    if not directory.is_dir():
        return None, "is not a folder"
    if spec.kind == "idx":
        found, missing = _find_idx(directory)
        if not missing:
            return _Source("idx", directory, found), ""
        if found:
            return None, "incomplete: lacks " + ", ".join(m + "[.gz]" for m in missing)
        return None, "holds none of the files"
    source, partial = _find_cifar(spec, directory)
    if source is not None:
        return source, ""
    return None, partial or "holds none of the files"


def _resolve(spec: _Spec, data_dir, download: bool) -> _Source:
    searched: list[_Searched] = []
    if data_dir is None and not _env_roots():
        searched.append(_Searched(f"${ENV_DATA}", None, "not set"))
    for label, directory in _locations(spec, data_dir):
        source, state = _probe(spec, directory)
        if source is not None:
            return source
        searched.append(_Searched(label, directory, state))

    if data_dir is not None:
        raise _not_found_error(spec, searched, "nothing was downloaded: an explicit data_dir "
                               "is only read, never written", data_dir=Path(data_dir))
    if not download:
        why = "nothing was downloaded: downloading is disabled (download=False)"
    elif os.environ.get(ENV_NO_DOWNLOAD, "").strip().lower() in ("1", "true", "yes", "on"):
        why = f"nothing was downloaded: downloading is disabled (${ENV_NO_DOWNLOAD} is set)"
    else:
        url = spec.urls[0]
        if not _is_online(url, ONLINE_PROBE_TIMEOUT_S):
            host = urllib.parse.urlsplit(url).hostname
            why = (f"nothing was downloaded: this machine seems offline ({host} did not "
                   f"answer within {ONLINE_PROBE_TIMEOUT_S:g} s)")
        else:
            try:
                return _download_into_cache(spec)
            except (OSError, DataError) as exc:
                why = f"the download into the user cache failed: {exc}"
    raise _not_found_error(spec, searched, why)


def _not_found_error(spec: _Spec, searched: list[_Searched], why: str, *,
                     data_dir: Path | None = None) -> DataError:
    lines = [f"no complete copy of the {spec.title} files was found; {why}.",
             "Searched, in order:"]
    for i, s in enumerate(searched, 1):
        where = f" {s.path}" if s.path is not None else ""
        lines.append(f"  {i}. {s.label}{where}: {s.state}")
    cache = _cache_dir(spec)
    if spec.kind == "idx":
        files = ", ".join(f + ".gz" for f in IDX_FILES)
        lines.append(f"Needed: the four IDX files {files} (each may also be uncompressed, "
                     "without '.gz'), all in one folder.")
    else:
        lines.append(f"Needed: the python-format batches {', '.join(spec.required_files)} "
                     f"(the folder {spec.inner_dir}/ unpacked from {spec.tarball}), or the "
                     f"tarball {spec.tarball} itself.")
    if data_dir is not None:
        hint = (f"put them in {data_dir}/, or leave out --data DIR (data_dir) to search "
                f"${ENV_DATA}/{spec.name}/ and {cache}/.")
    else:
        hint = (f"put them in a folder and pass it with --data DIR (data_dir=DIR in Python), "
                f"or in ${ENV_DATA}/{spec.name}/ with {ENV_DATA} set to the root folder, or in "
                f"{cache}/.")
    if spec.system_dirs:
        hint += (f" On Debian, apt-get install dataset-{spec.name} puts them in "
                 f"{spec.system_dirs[0]}.")
    return DataError(spec.name, "\n".join(lines), hint)


# ---------------------------------------------------------------------------------------------
# Downloads (only ever into the user cache)
# ---------------------------------------------------------------------------------------------

def _is_online(url: str, timeout: float = ONLINE_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds.

    Name resolution cannot be given a timeout, so the probe runs in a daemon thread that is
    abandoned if it has not finished in time.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    result = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="neurosim-online-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _download(url: str, dest: Path, sha256: str | None, *,
              timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` atomically, checking its SHA-256 before it lands.

    The bytes go to a temporary file beside ``dest``, are hashed on the way and fsynced, and the
    file is renamed onto ``dest`` only when the hash matches; on any failure the temporary file
    is removed and ``dest`` is left as it was.

    Parameters
    ----------
    url
        Where to fetch from.
    dest
        Final path.
    sha256
        Expected lower-case hex SHA-256, or None to skip the check.
    timeout
        Socket timeout in seconds.

    Returns
    -------
    pathlib.Path
        ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        request = urllib.request.Request(url, headers={"User-Agent": "neurosim"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if sha256 is not None and got != sha256:
            raise DataError(str(dest), f"the download from {url} has SHA-256 {_short(got)}, not "
                            f"the canonical {_short(sha256)}; it was discarded.",
                            "try again later or fetch the file by hand.")
        os.replace(tmp, dest)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    return dest


def _download_into_cache(spec: _Spec) -> _Source:
    cache = _cache_dir(spec)
    if spec.kind == "idx":
        _, missing = _find_idx(cache) if cache.is_dir() else ({}, list(IDX_FILES))
        for base in missing:
            name = base + ".gz"
            errors = []
            for mirror in spec.urls:
                try:
                    _download(mirror + name, cache / name, spec.sha256[name])
                    break
                except (OSError, DataError) as exc:
                    errors.append(f"{mirror + name}: {exc}")
            else:
                raise DataError(f"{spec.name}/{name}", "could not be downloaded: "
                                + "; ".join(errors))
    else:
        tar = cache / spec.tarball
        if not tar.is_file():
            _download(spec.urls[0], tar, spec.sha256[spec.tarball])
    source, state = _probe(spec, cache)
    if source is None:  # pragma: no cover - defensive
        raise DataError(spec.name, f"{cache}: {state} after the download.")
    return source


# ---------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------

def _short(digest: str) -> str:
    return digest[:16] + "…"


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _merge_checksums(spec: _Spec, checksums) -> tuple[dict[str, str], tuple]:
    table = dict(spec.sha256)
    if checksums is None:
        return table, ()
    if not isinstance(checksums, Mapping):
        raise ValidationError("load_dataset.checksums", f"got {type(checksums).__name__}; "
                              "expected a dict of file name -> SHA-256 hex digest.")
    known = spec.known_names
    override = {}
    for key, value in checksums.items():
        name = Path(str(key)).name
        if name not in known:
            raise ValidationError("load_dataset.checksums", f"unknown file name {key!r} for "
                                  f"{spec.title}; expected one of {', '.join(sorted(known))}.")
        digest = str(value).strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValidationError(f"load_dataset.checksums[{key!r}]", f"got {value!r}; expected "
                                  "a SHA-256 digest of 64 hex digits.")
        override[name] = digest
    table.update(override)
    return table, tuple(sorted(override.items()))


def _mismatch(where: str, path: Path, got: str, expected: str, extra: str = "") -> DataError:
    return DataError(where, f"SHA-256 {_short(got)} of {path} does not match the canonical "
                     f"{_short(expected)}{extra}; the file is corrupt or truncated.",
                     "download it again (delete it, or replace it with a good copy), or pass "
                     "verify=False to skip checksums.")


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# ---------------------------------------------------------------------------------------------

_IDX_IMAGES_MAGIC = 0x00000803   # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801   # unsigned bytes, 1 dimension


def _gunzip(data: bytes, where: str, path: Path) -> bytes:
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(where, f"{path} is not a valid gzip file ({exc}); it is corrupt or "
                        "truncated.", "download it again, or replace it with a good copy.") from None


def _read_idx_payload(spec: _Spec, path: Path, verify: bool, table: dict[str, str]) -> bytes:
    """Read one IDX file (gzip or raw), verify it, return the decompressed IDX bytes."""
    where = f"{spec.name}/{path.name}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(where, f"cannot read {path}: {exc}.", "check its permissions.") from None
    is_gz = data[:2] == b"\x1f\x8b"
    base = path.name[:-3] if path.name.endswith(".gz") else path.name
    if not verify:
        return _gunzip(data, where, path) if is_gz else data

    expected_file = table.get(path.name)
    got_file = _sha256(data)
    if expected_file is not None and got_file == expected_file:
        return _gunzip(data, where, path) if is_gz else data
    expected_content = table.get(base)
    if not is_gz:
        expected = expected_content or expected_file
        if expected is None:
            raise _no_checksum(spec, path)
        if got_file != expected:
            raise _mismatch(where, path, got_file, expected)
        return data
    # A gzip file whose own bytes are not canonical: accept it if its content is.
    try:
        payload = gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as exc:
        if expected_file is None and expected_content is None:
            raise _no_checksum(spec, path) from None
        raise _mismatch(where, path, got_file, expected_file or expected_content,
                        f", and it does not decompress ({exc})") from None
    if expected_content is not None and _sha256(payload) == expected_content:
        return payload
    if expected_file is None and expected_content is None:
        raise _no_checksum(spec, path)
    extra = "" if expected_content is None else \
        ", and neither does its decompressed content"
    raise _mismatch(where, path, got_file, expected_file or expected_content, extra)


def _no_checksum(spec: _Spec, path: Path) -> DataError:
    return DataError(f"{spec.name}/{path.name}", f"no canonical checksum is known for {path}.",
                     "pass checksums={file name: sha256} or verify=False.")


def _parse_idx(spec: _Spec, path: Path, payload: bytes, images: bool) -> np.ndarray:
    where = f"{spec.name}/{path.name}"
    expected_magic = _IDX_IMAGES_MAGIC if images else _IDX_LABELS_MAGIC
    what = "image" if images else "label"
    if len(payload) < 4:
        raise DataError(where, f"{path} holds {len(payload)} bytes, too short for an IDX header; "
                        "the file is truncated.", "download it again.")
    magic = int.from_bytes(payload[:4], "big")
    if magic != expected_magic:
        other = {_IDX_IMAGES_MAGIC: " (that of an IDX image file)",
                 _IDX_LABELS_MAGIC: " (that of an IDX label file)"}.get(magic, "")
        raise DataError(where, f"{path} starts with magic number 0x{magic:08x}{other}; expected "
                        f"0x{expected_magic:08x}, an IDX {what} file of unsigned bytes.",
                        "check that the file is the one its name says (images and labels not "
                        "swapped, not a different format).")
    ndim = payload[3]
    header = 4 + 4 * ndim
    if len(payload) < header:
        raise DataError(where, f"{path} ends inside its header ({len(payload)} bytes, header "
                        f"needs {header}); the file is truncated.", "download it again.")
    dims = struct.unpack(f">{ndim}I", payload[4:header])
    if images and tuple(dims[1:]) != spec.image_shape:
        raise DataError(where, f"{path} holds images of {'x'.join(map(str, dims[1:]))} pixels; "
                        f"expected {'x'.join(map(str, spec.image_shape))}.",
                        f"use the {spec.title} files.")
    n = dims[0]
    if n == 0:
        raise DataError(where, f"{path} holds no {what}s.", "download it again.")
    need = header + int(np.prod(dims, dtype=np.int64))
    if len(payload) < need:
        raise DataError(where, f"{path} has {len(payload) - header} data bytes but its header "
                        f"announces {n} {what}s ({need - header} bytes); the file is truncated.",
                        "download it again.")
    if len(payload) > need:
        raise DataError(where, f"{path} has {len(payload) - need} bytes after the {n} {what}s "
                        "its header announces; the file is corrupt.", "download it again.")
    array = np.frombuffer(payload, dtype=np.uint8, count=need - header, offset=header)
    array = array.reshape(dims)
    if not images:
        top = int(array.max())
        if top >= spec.n_classes:
            bad = int(np.argmax(array >= spec.n_classes))
            raise DataError(where, f"{path} has label {top} (first bad one at index {bad}); "
                            f"expected labels 0..{spec.n_classes - 1}.",
                            "the file is corrupt or not a label file; download it again.")
    return array


def _load_idx(spec: _Spec, source: _Source, verify: bool, table: dict[str, str]):
    arrays = {}
    for base in IDX_FILES:
        path = source.files[base]
        payload = _read_idx_payload(spec, path, verify, table)
        arrays[base] = _parse_idx(spec, path, payload, images="images" in base)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = arrays[f"{prefix}-images-idx3-ubyte"]
        labels = arrays[f"{prefix}-labels-idx1-ubyte"]
        if images.shape[0] != labels.shape[0]:
            ipath = source.files[f"{prefix}-images-idx3-ubyte"]
            lpath = source.files[f"{prefix}-labels-idx1-ubyte"]
            raise DataError(f"{spec.name}/{lpath.name}", f"{ipath} holds {images.shape[0]} "
                            f"images but {lpath} holds {labels.shape[0]} labels; expected the "
                            "same count.", "one of the two files is from another data set or "
                            "damaged; download both again.")
        out[split] = (images, labels.astype(np.int64))
    return _Raw(out["train"][0], out["train"][1], out["test"][0], out["test"][1],
                {}, spec.class_names)


# ---------------------------------------------------------------------------------------------
# CIFAR (python pickle format)
# ---------------------------------------------------------------------------------------------

class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers.

    CIFAR batches are pickled dicts of a uint8 array, label lists and byte strings; anything
    else (in particular arbitrary callables) is refused, so a hostile file cannot run code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle(data: bytes, where: str, path: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - any failure means a bad file
        raise DataError(where, f"{path} is not a readable CIFAR python batch ({type(exc).__name__}: "
                        f"{exc}); it is corrupt, truncated or of another format.",
                        "replace it with the file unpacked from the canonical tarball.") from None
    if not isinstance(obj, dict):
        raise DataError(where, f"{path} holds a {type(obj).__name__}; expected a dict with "
                        "'data' and label keys.", "use the python version of CIFAR, not the "
                        "binary or matlab one.")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _check_batch(spec: _Spec, batch: dict, where: str, path: str, label_keys) -> tuple:
    keys = ["data", *label_keys]
    missing = [k for k in keys if k not in batch]
    if missing:
        raise DataError(where, f"{path} lacks key(s) {', '.join(map(repr, missing))} (has "
                        f"{', '.join(map(repr, sorted(map(str, batch))))}); expected "
                        f"{', '.join(map(repr, keys))}.",
                        f"is this a {spec.title} batch? CIFAR-10 and CIFAR-100 differ.")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072 or data.shape[0] == 0:
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise DataError(where, f"{path}: 'data' is a {desc}; expected a uint8 array of shape "
                        "(n, 3072) (10000 rows in the canonical batches).",
                        "the file is corrupt or of another format.")
    n = data.shape[0]
    labels = []
    for key, n_classes in label_keys.items():
        try:
            y = np.asarray(batch[key])
        except Exception:  # noqa: BLE001
            y = np.asarray([])
        if y.ndim != 1 or y.shape[0] != n or not np.issubdtype(y.dtype, np.integer):
            raise DataError(where, f"{path}: {key!r} holds {y.shape[0] if y.ndim == 1 else y.shape}"
                            f" values of type {y.dtype}; expected {n} integer labels, one per "
                            "row of 'data'.", "the file is corrupt.")
        if n and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise DataError(where, f"{path}: {key!r} ranges over {int(y.min())}..{int(y.max())};"
                            f" expected 0..{n_classes - 1}.", "the file is corrupt.")
        labels.append(y.astype(np.int64))
    return data, labels


def _cifar_label_keys(spec: _Spec) -> dict[str, int]:
    if spec.name == "cifar-10":
        return {"labels": 10}
    return {"fine_labels": 100, "coarse_labels": 20}


def _load_cifar(spec: _Spec, source: _Source, verify: bool, table: dict[str, str]):
    blobs: dict[str, tuple[bytes, str]] = {}
    wanted = (*spec.required_files, spec.meta_file)
    if source.kind == "cifar-tar":
        tar_path = source.files["tarball"]
        where = f"{spec.name}/{tar_path.name}"
        try:
            raw = tar_path.read_bytes()
        except OSError as exc:
            raise DataError(where, f"cannot read {tar_path}: {exc}.") from None
        if verify:
            expected = table.get(tar_path.name)
            got = _sha256(raw)
            if expected is None:
                raise _no_checksum(spec, tar_path)
            if got != expected:
                raise _mismatch(where, tar_path, got, expected)
        try:
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tar:
                for member in tar:
                    member_name = member.name[2:] if member.name.startswith("./") \
                        else member.name
                    parts = member_name.split("/")
                    if member.isfile() and len(parts) == 2 and parts[0] == spec.inner_dir \
                            and parts[1] in wanted:
                        blobs[parts[1]] = (tar.extractfile(member).read(),
                                           f"{tar_path}:{member.name}")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise DataError(where, f"{tar_path} is not a readable tar.gz ({exc}); it is corrupt "
                            "or truncated.", "download it again.") from None
        missing = [f for f in spec.required_files if f not in blobs]
        if missing:
            raise DataError(where, f"{tar_path} lacks {', '.join(spec.inner_dir + '/' + m for m in missing)}"
                            f"; expected the python-format {spec.title} tarball.",
                            f"use {spec.tarball} (python version), not the binary or matlab one.")
    else:
        for name, path in source.files.items():
            where = f"{spec.name}/{name}"
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(where, f"cannot read {path}: {exc}.") from None
            if verify and name in table:      # pickle batches are checked only on request
                got = _sha256(data)
                if got != table[name]:
                    raise _mismatch(where, path, got, table[name])
            blobs[name] = (data, str(path))

    label_keys = _cifar_label_keys(spec)
    parts = {"train": [], "test": []}
    for split, names in (("train", spec.train_files), ("test", spec.test_files)):
        for name in names:
            data, origin = blobs[name]
            batch = _unpickle(data, f"{spec.name}/{name}", origin)
            del data
            parts[split].append(_check_batch(spec, batch, f"{spec.name}/{name}", origin,
                                             label_keys))
    blobs_meta = blobs.get(spec.meta_file)
    names = _cifar_class_names(spec, blobs_meta)

    def stack(split):
        xs = [p[0] for p in parts[split]]
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        ys = [np.concatenate([p[1][i] for p in parts[split]]) for i in range(len(label_keys))]
        return x, ys

    x_train, ys_train = stack("train")
    x_test, ys_test = stack("test")
    extra = {}
    if spec.name == "cifar-100":
        extra = {"coarse": (ys_train[1], ys_test[1], names.get("coarse"))}
    return _Raw(x_train, ys_train[0], x_test, ys_test[0], extra, names.get("fine"))


def _cifar_class_names(spec: _Spec, meta) -> dict:
    names = {"fine": spec.class_names, "coarse": None}
    if meta is None:
        return names
    try:
        obj = _unpickle(meta[0], f"{spec.name}/{spec.meta_file}", meta[1])
    except DataError:
        return names        # the meta file is optional; a bad one only costs the names

    def clean(values):
        if not isinstance(values, (list, tuple)):
            return None
        return tuple(v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values)

    if spec.name == "cifar-10":
        names["fine"] = clean(obj.get("label_names")) or spec.class_names
    else:
        names["fine"] = clean(obj.get("fine_label_names"))
        names["coarse"] = clean(obj.get("coarse_label_names"))
    return names


# ---------------------------------------------------------------------------------------------
# In-process cache and the entry point
# ---------------------------------------------------------------------------------------------

@dataclass
class _Raw:
    x_train: np.ndarray            # uint8, (n, *image_shape) or (n, 3072); read-only in cache
    y_train: np.ndarray            # int64
    x_test: np.ndarray
    y_test: np.ndarray
    extra_labels: dict             # cifar-100: {"coarse": (y_train, y_test, names)}
    class_names: tuple[str, ...] | None


_CACHE: dict[tuple, _Raw] = {}
_CACHE_LOCK = threading.Lock()
_TO_FLOAT = (np.arange(256, dtype=np.float32) / np.float32(255.0))


def clear_cache() -> None:
    """Forget every data set decoded so far in this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _source_files(spec: _Spec, source: _Source) -> tuple[Path, ...]:
    if source.kind == "cifar-tar":
        return (source.files["tarball"],)
    return tuple(source.files[f] for f in spec.required_files)


def _signature(source: _Source) -> tuple:
    sig = []
    for key in sorted(source.files):
        path = source.files[key]
        st = path.stat()
        sig.append((key, str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sig)


def _check_limit(train_limit, available: int, spec: _Spec):
    if train_limit is None:
        return None
    if isinstance(train_limit, bool):
        raise ValidationError("load_dataset.train_limit", f"got {train_limit!r}; expected a "
                              "positive integer or None.")
    try:
        n = operator.index(train_limit)
    except TypeError:
        raise ValidationError("load_dataset.train_limit", f"got {train_limit!r} "
                              f"({type(train_limit).__name__}); expected a positive integer or "
                              "None.", "pass e.g. train_limit=1000.") from None
    if n <= 0 or n > available:
        raise ValidationError("load_dataset.train_limit", f"got {n}; expected 1..{available} "
                              f"({spec.title} has {available} training samples).",
                              "use None for all of them.")
    return n


def load_dataset(name: str, data_dir=None, train_limit: int | None = None, verify: bool = True,
                 flatten: bool = True, *, checksums: Mapping[str, str] | None = None,
                 label_mode: str = "fine", download: bool = True) -> Dataset:
    """Load MNIST, Fashion-MNIST, CIFAR-10 or CIFAR-100.

    Parameters
    ----------
    name
        ``"mnist"``, ``"fashion-mnist"`` (or ``"fashion_mnist"``), ``"cifar10"``/``"cifar-10"``
        or ``"cifar100"``/``"cifar-100"`` (case-insensitive).
    data_dir
        Folder holding the data set's own files (the four IDX files, or for CIFAR the batches,
        their ``cifar-10-batches-py``/``cifar-100-python`` parent, or the ``.tar.gz``). When
        given, only this folder is searched and nothing is downloaded. When None, the places
        listed in the module documentation are searched in order.
    train_limit
        Keep only the first ``train_limit`` training samples (1 up to the number available).
        The test set is always complete.
    verify
        Check every file against the embedded canonical SHA-256 (or ``checksums``). The
        structure is validated either way.
    flatten
        Return inputs as ``(n, features)`` rows (default) rather than ``(n, 28, 28)`` or
        ``(n, 3, 32, 32)`` images.
    checksums
        File name to SHA-256 overrides, merged over the embedded sums (e.g. for generated test
        files). For IDX files a ``.gz`` name is checked against the file's bytes and a name
        without ``.gz`` against the decompressed content. CIFAR pickle batches are checked only
        when they appear here.
    label_mode
        CIFAR-100 only: ``"fine"`` (100 classes, default) or ``"coarse"`` (20 superclasses).
    download
        Allow a download into the user cache when no local copy exists and the host answers
        quickly. ``NEUROSIM_NO_DOWNLOAD=1`` also forbids it.

    Returns
    -------
    Dataset
        float32 inputs in ``[0, 1]``, int64 labels, and where they came from.

    Raises
    ------
    neurosim.errors.DataError
        A file is missing, truncated, malformed or fails its checksum. The message names the
        file, what was found and expected, and how to fix it; for missing files it lists every
        place searched.
    neurosim.errors.ValidationError
        A bad argument (unknown name, bad ``train_limit``, ``label_mode`` or ``checksums``).

    Examples
    --------
    >>> ds = load_dataset("mnist", train_limit=1000)          # doctest: +SKIP
    >>> ds.x_train.shape, ds.x_test.shape
    ((1000, 784), (10000, 784))
    """
    spec = _spec(name)
    if label_mode not in ("fine", "coarse"):
        raise ValidationError("load_dataset.label_mode", f"got {label_mode!r}; expected 'fine' "
                              "or 'coarse'.")
    if label_mode == "coarse" and spec.name != "cifar-100":
        raise ValidationError("load_dataset.label_mode", f"got 'coarse' for {spec.title}; "
                              "coarse labels exist only for CIFAR-100.")
    if data_dir is not None:
        if not isinstance(data_dir, (str, os.PathLike)):
            raise ValidationError("load_dataset.data_dir", f"got {type(data_dir).__name__}; "
                                  "expected a folder path (str or Path) or None.")
    table, override_key = _merge_checksums(spec, checksums)
    verify = bool(verify)

    source = _resolve(spec, data_dir, download)
    sig = _signature(source)
    raw = None
    with _CACHE_LOCK:
        for v in ((True, False) if not verify else (True,)):
            raw = _CACHE.get((spec.name, sig, v, override_key if v else ()))
            if raw is not None:
                break
    if raw is None:
        if spec.kind == "idx":
            raw = _load_idx(spec, source, verify, table)
        else:
            raw = _load_cifar(spec, source, verify, table)
        for arr in (raw.x_train, raw.y_train, raw.x_test, raw.y_test,
                    *(a for v in raw.extra_labels.values() for a in v[:2])):
            arr.flags.writeable = False
        with _CACHE_LOCK:
            _CACHE[(spec.name, sig, verify, override_key if verify else ())] = raw

    y_train, y_test, n_classes, class_names = raw.y_train, raw.y_test, spec.n_classes, \
        raw.class_names
    if label_mode == "coarse":
        y_train, y_test, class_names = raw.extra_labels["coarse"]
        n_classes = 20

    n = _check_limit(train_limit, raw.x_train.shape[0], spec)
    x_train_u8 = raw.x_train if n is None else raw.x_train[:n]
    y_train = y_train if n is None else y_train[:n]
    shape = (int(np.prod(spec.image_shape)),) if flatten else spec.image_shape

    def to_float(u8):
        return _TO_FLOAT[u8.reshape((u8.shape[0], *shape))]

    x_train = to_float(x_train_u8)
    x_test = to_float(raw.x_test)
    return Dataset(
        name=spec.name, x_train=x_train, y_train=np.array(y_train, dtype=np.int64),
        x_test=x_test, y_test=np.array(y_test, dtype=np.int64), n_classes=n_classes,
        source_dir=source.directory, input_shape=tuple(x_train.shape[1:]),
        image_shape=spec.image_shape, class_names=class_names, files=_source_files(spec, source),
        verified=verify,
    )
