"""Put FashionMNIST where torchvision expects it, offline when possible.

    python -m source.data.fashion_mnist_setup --data-dir data

makes sure ``<data_dir>/FashionMNIST/raw/`` holds the four uncompressed idx files, trying in
order: (1) they are already there -> nothing to do; (2) the Debian package
``dataset-fashion-mnist`` is installed (``/usr/share/datasets/fashion-mnist/*.gz``) -> decompress
its files; (3) running as root on Debian/Ubuntu -> ``apt-get install dataset-fashion-mnist``, then
(2); (4) torchvision's download. Otherwise it exits non-zero saying how to get the data.
"""
from __future__ import annotations

import argparse
import gzip
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from source.data.datasets import DatasetNotFoundError
from source.run.errors import CommandLineParser, add_debug_argument, run_entry_point

logger = logging.getLogger(__name__)

RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def raw_folder(data_dir: Path) -> Path:
    """``<data_dir>/FashionMNIST/raw``, where ``torchvision.datasets.FashionMNIST`` reads from."""
    return Path(data_dir) / "FashionMNIST" / "raw"


def _missing(raw: Path) -> list[str]:
    return [name for name in RAW_FILES if not (raw / name).is_file()]


def _has_archives(source: Path) -> bool:
    return all((source / f"{name}.gz").is_file() for name in RAW_FILES)


def _decompress(source: Path, raw: Path) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for name in _missing(raw):
        # Temp file + rename: an interrupted run never leaves a truncated idx file behind.
        with gzip.open(source / f"{name}.gz", "rb") as compressed, tempfile.NamedTemporaryFile(
            "wb", dir=raw, prefix=f".{name}.", delete=False
        ) as out:
            shutil.copyfileobj(compressed, out)
        os.chmod(out.name, 0o644)  # NamedTemporaryFile creates 0600 files
        os.replace(out.name, raw / name)
        logger.info("decompressed %s -> %s", source / f"{name}.gz", raw / name)


def _apt_install() -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    logger.info("installing the Debian package %s with apt-get", DEBIAN_PACKAGE)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", DEBIAN_PACKAGE], check=True, env=env)
    except (subprocess.CalledProcessError, OSError) as error:
        logger.warning("apt-get install %s failed: %s", DEBIAN_PACKAGE, error)
        return False
    return True


def _torchvision_download(data_dir: Path) -> bool:
    from torchvision.datasets import FashionMNIST

    logger.info("downloading FashionMNIST with torchvision into %s", raw_folder(data_dir))
    try:
        FashionMNIST(str(data_dir), train=True, download=True)
    except Exception as error:  # network errors come in many types (URLError, OSError, RuntimeError)
        logger.warning("torchvision could not download FashionMNIST: %s", error)
        return False
    return True


def ensure_fashion_mnist(
    data_dir: Path,
    debian_dir: Path = DEBIAN_DIR,
    allow_apt: bool = True,
    allow_download: bool = True,
) -> Path:
    """Make ``<data_dir>/FashionMNIST/raw`` hold the four idx files; return that folder.

    ``debian_dir``, ``allow_apt`` and ``allow_download`` exist so tests can exercise each route.
    Raises :class:`DatasetNotFoundError` when no route works.
    """
    data_dir = Path(data_dir)
    raw = raw_folder(data_dir)
    if not _missing(raw):
        logger.info("FashionMNIST already present in %s; nothing to do", raw)
        return raw
    if not _has_archives(debian_dir) and allow_apt:
        _apt_install()  # the package puts its archives into DEBIAN_DIR
    if _has_archives(debian_dir):
        _decompress(debian_dir, raw)
    elif allow_download:
        _torchvision_download(data_dir)
    missing = _missing(raw)
    if missing:
        raise DatasetNotFoundError(
            "fashionmnist",
            raw,
            "FashionMNIST/raw/{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte",
            f"Install the Debian package ({'sudo ' if os.name == 'posix' else ''}apt-get install {DEBIAN_PACKAGE}) and rerun, "
            "or download the four .gz files from https://github.com/zalandoresearch/fashion-mnist, "
            f"gunzip them into {raw}.",
            detail=f"still missing: {', '.join(missing)}",
        )
    return raw


def get_args_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("./data/"), help="Root folder of all datasets.")
    parser.add_argument("--no-download", action="store_true", help="Never use the network (apt-get or torchvision).")
    add_debug_argument(parser)
    return parser


def main(args: argparse.Namespace) -> None:
    """Raises :class:`DatasetNotFoundError` (a user error) when the files cannot be obtained."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raw = ensure_fashion_mnist(args.data_dir, allow_apt=not args.no_download, allow_download=not args.no_download)
    print(f"FashionMNIST ready in {raw}")


if __name__ == "__main__":
    run_entry_point(main, get_args_parser())
