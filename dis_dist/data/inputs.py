"""What an input URL holds, told in one place for everything that opens one: the encoder's
``--input`` (under ``--input-format auto``), fid's samples and reference, and the reference an
evaluation during training compares against."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Literal

from dis_dist.data import fs
from dis_dist.data.fmnist import SPLIT_FILES
from dis_dist.errors import DataError
from dis_dist.utils.npz import npz_keys

UrlKind = Literal["statistics", "npz", "fmnist", "shards", "folder"]
NPZ_KINDS = ("statistics", "npz")  # the kinds that are one .npz file
# Fashion-MNIST's IDX directory is told by its training images, plain or gzipped.
_FMNIST_FILES = {SPLIT_FILES["train"][0], SPLIT_FILES["train"][0] + ".gz"}


def url_kind(url: str, options: fs.StorageOptions | None = None) -> UrlKind:
    """Tell what ``url`` holds from its name, an ``.npz``'s list of arrays and a directory
    listing, without reading any image:

    - ``statistics``: a local ``.npz`` file of reference statistics (mu, sigma) and no images;
    - ``npz``: any other ``.npz`` URL, images as ADM writes them (``arr_0``, labels in
      ``arr_1``), whether or not the file exists or is a zip file (opening it says which);
    - ``fmnist``: a directory of Fashion-MNIST's IDX files;
    - ``shards``: a ``.tar`` URL, or a directory with ``.tar`` files in it (image webdataset shards);
    - ``folder``: anything else, taken as an ImageFolder tree (class sub-folders of images); a
      URL that does not exist is one too, and opening it says so."""
    if url.endswith(".npz"):
        if Path(url).is_file():
            try:
                keys = set(npz_keys(url))
            except DataError:
                return "npz"
            if keys & {"mu", "sigma"} and "arr_0" not in keys:
                return "statistics"
        return "npz"
    fsys, root = fs.filesystem(url, options)
    try:
        listing = fsys.ls(root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        listing = []
    if {PurePosixPath(p).name for p in listing} & _FMNIST_FILES:
        return "fmnist"
    if root.endswith(".tar") or any(p.endswith(".tar") for p in listing):
        return "shards"
    return "folder"
