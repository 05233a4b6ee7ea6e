"""Local paths against remote URIs, decided in one place for everything that hands a location on, and the
checks that turn a URI mapray cannot use into one line naming its config key before Ray starts."""

from __future__ import annotations

import os

import fsspec

from mapray.errors import ConfigError, first_line

LOCAL_PROTOCOLS = (None, "file", "local")
# fsspec finds these filesystems in packages of their own, installed with mapray's extras of these names
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
# object stores: a path's first segment is a bucket (container), which a missing one must not be created for
BUCKETED = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"}

# Other processes write into mapray's folders all the time (Ray's workers through pyarrow, a resumed or the next
# run). A listing s3fs cached earlier in this process hides their files from `exists`, `info` and `open` (seen: a
# resumed run's own checkpoint files "not found" right after `find` had listed them). Every fsspec instance made
# after mapray is imported, wherever in mapray, lists afresh; a setting of the user's own is kept.
for _protocol in BUCKETED:
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_local(uri: str) -> bool:
    return fsspec.core.split_protocol(uri)[0] in LOCAL_PROTOCOLS


def absolute(uri: str) -> str:
    """A local path made absolute against this (the driver's) working directory, remote URIs unchanged.

    Ray's workers run elsewhere, and pyarrow filesystems do not resolve relative paths: Ray Data's checkpoint
    refuses `out/demo/...` outright (InvalidCheckpointingConfig), which broke `mapray demo`'s default output.
    """
    return os.path.abspath(fsspec.core.strip_protocol(uri)) if is_local(uri) else uri


def filesystem(uri: str, key: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of `uri`, without any I/O; a protocol whose package is not installed, or
    that fsspec does not know, is a ConfigError naming `key`."""
    protocol = fsspec.core.split_protocol(uri)[0]
    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError:
        package, extra = EXTRAS.get(protocol, (None, None))
        if package is None:
            raise ConfigError(f"{key}: {uri} needs a filesystem package for {protocol}:// that is not "
                              "installed") from None
        raise ConfigError(f"{key}: {uri} needs the {package} package, which is not installed "
                          f"(pip install 'mapray[{extra}]')") from None
    except ValueError as e:  # fsspec: "Protocol not known: ..."
        raise ConfigError(f"{key}: {uri}: {first_line(e)}") from None


def reachable(uri: str, key: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """`filesystem(uri, key)`, after checking that an object store's bucket exists and answers: an unreachable
    endpoint, missing credentials or a misspelt bucket stop the run here with one line, not in a Ray worker
    (and an output bucket is never created by accident: s3fs's `makedirs` would create a missing one)."""
    fs, path = filesystem(uri, key)
    if fsspec.core.split_protocol(uri)[0] not in BUCKETED:
        return fs, path
    bucket = path.split("/", 1)[0]
    try:
        fs.info(bucket)  # HEAD bucket; s3fs's `exists` would answer False for an endpoint it cannot reach
    except FileNotFoundError:
        raise ConfigError(f"{key}: bucket {bucket!r} does not exist ({uri})") from None
    except PermissionError as e:
        raise ConfigError(f"{key}: no access to bucket {bucket!r} ({uri}): {first_line(e)}") from None
    except Exception as e:  # an endpoint that does not answer, bad credentials
        raise ConfigError(f"{key}: cannot reach {uri}: {first_line(e)}") from None
    return fs, path


def move_folder(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Moves folder `src` (a path of `fs`) to `dst`, which must not exist. A local folder is renamed in one step.
    On an object store a folder is a key prefix: its files are copied, then `src` is deleted, so a reader may see
    part of `dst` meanwhile (readers wait for a marker written after it, as publishing does with manifest.json).
    s3fs's recursive `mv` fails there: it tries to copy the folder's own name beside the empty marker object
    pyarrow (so Ray Data) writes for a folder."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols:
        fs.mv(src, dst, recursive=True)
        return
    files = [p for p in fs.find(src) if not p.endswith("/")]
    fs.copy(files, [dst + p[len(src):] for p in files])
    fs.rm(src, recursive=True)

