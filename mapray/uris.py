"""Local paths against remote URIs, decided in one place for everything that hands a location on."""

from __future__ import annotations

import os

import fsspec

LOCAL_PROTOCOLS = (None, "file", "local")


def is_local(uri: str) -> bool:
    return fsspec.core.split_protocol(uri)[0] in LOCAL_PROTOCOLS


def absolute(uri: str) -> str:
    """A local path made absolute against this (the driver's) working directory, remote URIs unchanged.

    Ray's workers run elsewhere, and pyarrow filesystems do not resolve relative paths: Ray Data's checkpoint
    refuses `out/demo/...` outright (InvalidCheckpointingConfig), which broke `mapray demo`'s default output.
    """
    return os.path.abspath(fsspec.core.strip_protocol(uri)) if is_local(uri) else uri
