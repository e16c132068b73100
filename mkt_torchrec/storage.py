"""One filesystem layer for datasets: a location is a local path or a URI (``s3://``, ``gs://``, ``hdfs://``,
``abfs://``, ``file://``, or any scheme fsspec knows).

Every read and write of a dataset goes through here, so the rest of the package never calls ``os.path`` on a
user's data location and never learns which store it is on. :func:`filesystem` turns a location into a
``pyarrow.fs`` filesystem and a path on it: pyarrow's own filesystems for the schemes it has, fsspec's (wrapped in
``pyarrow.fs.PyFileSystem``) for the rest, and the local filesystem with an absolute path for a plain path.

**Settings come from the environment only.** An object store's endpoint, region and credentials are read by the
store's client from the standard variables (:data:`ENVIRONMENT`; for S3 also ``~/.aws/credentials`` and
``~/.aws/config``). pyarrow 16 and later honour ``AWS_ENDPOINT_URL`` and ``AWS_ENDPOINT_URL_S3`` themselves, so
nothing here passes an endpoint. A URI that carries a secret (``s3://KEY:SECRET@bucket/...``, ``?sig=...``) is
refused, so no secret reaches a run record or a log through the location of a dataset.

**Errors are one line.** A store that cannot be reached, refuses these credentials or lacks the bucket raises
``OSError`` naming the location and the variables that were looked for (their names, never their values).

**Publishing a directory.** :class:`StagedDirectory` writes a directory that readers see whole or not at all:
locally by renaming a finished ``DIR.tmp-<pid>`` into place; on an object store (which cannot rename) by writing
uniquely named files under the final prefix and the marker file (``manifest.json``) last, in one object write.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from mkt_torchrec.fsutil import check_replaceable, replace_dir

if TYPE_CHECKING:  # pyarrow is imported where it is used: cli.py imports this module, and `mkt --help` stays light
    import pyarrow as pa
    import pyarrow.fs as pafs

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_NATIVE = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")  # pyarrow's FileSystem.from_uri
_BUCKETED = ("s3", "gcs", "abfs")  # pyarrow filesystem types whose first path component is a bucket / container
_TOKEN_PREFIX = "mkt"  # an attempt's file: STEM-mkt<12 hex>.EXT (distinct from Spark's part-NNNNN-<uuid> names)
_ATTEMPT_FILE = re.compile(rf"-{_TOKEN_PREFIX}([0-9a-f]{{12}})(?:\.|$)")
_SECRET_QUERY = re.compile(r"secret|password|passwd|token|sig|signature|credential|key", re.IGNORECASE)

# What each store's client reads its endpoint, region and credentials from (named in errors, never their values).
ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "s3": ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
           "AWS_SHARED_CREDENTIALS_FILE"),
    "gs": ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST"),
    "abfs": ("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET"),
    "hdfs": ("HADOOP_HOME", "HADOOP_CONF_DIR", "CLASSPATH", "ARROW_LIBHDFS_DIR", "JAVA_HOME"),
}
_ALIASES = {"gcs": "gs", "abfss": "abfs", "viewfs": "hdfs", "s3a": "s3", "s3n": "s3"}


def is_attempt_file(rel_path: str, token: str | None = None) -> bool:
    """``rel_path`` was written on an object store by a :class:`StagedDirectory` (of the attempt ``token``, if
    given): its name carries an attempt's token."""
    found = _ATTEMPT_FILE.search(rel_path.rsplit("/", 1)[-1])
    return found is not None and (token is None or found.group(1) == token)


def is_uri(location: str) -> bool:
    """``location`` is a URI (``scheme://...``) rather than a local path."""
    return bool(_URI.match(location))


def _scheme(location: str) -> str:
    return location.split("://", 1)[0].lower() if is_uri(location) else ""


def _refuse_secrets(location: str) -> None:
    """Raise if ``location`` carries a secret, so it can be recorded and logged as it is."""
    parts = urlsplit(location)
    secret_query = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_QUERY.search(k)]
    bucketed = _ALIASES.get(_scheme(location), _scheme(location)) in ("s3", "gs")  # user information is a key
    if parts.password is not None or (parts.username and bucketed) or secret_query:
        where = "query parameters " + ", ".join(secret_query) if secret_query else "user information"
        raise ValueError(f"{display(location)}: the URI carries credentials ({where}); give them through the "
                         f"environment instead ({', '.join(_variables(location))}), never in a path that is "
                         "recorded and logged")


def _variables(location: str) -> list[str]:
    scheme = _ALIASES.get(_scheme(location), _scheme(location))
    names = list(ENVIRONMENT.get(scheme, ()))
    return names + (["~/.aws/credentials", "~/.aws/config"] if scheme == "s3" else [])


def _environment_hint(location: str) -> str:
    names = _variables(location)
    if not names:
        return "its fsspec implementation's settings apply"
    found = [n for n in names if (os.path.exists(os.path.expanduser(n)) if n.startswith("~") else n in os.environ)]
    return f"looked for {', '.join(names)} (found: {', '.join(found) or 'none'})"


def display(location: str) -> str:
    """``location`` as it may be shown or logged: a password and secret query values are masked."""
    if not is_uri(location):
        return location
    parts = urlsplit(location)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username}:***@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(f"{k}={'***' if _SECRET_QUERY.search(k) else v}"
                     for k, v in parse_qsl(parts.query, keep_blank_values=True))
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def absolute(location: str) -> str:
    """What to record for ``location`` (a run record's ``data``): a local path made absolute, a URI as it is."""
    return location if is_uri(location) else os.path.abspath(location)


def join(base: str, *parts: str) -> str:
    """``base`` and relative ``parts`` joined with ``/`` for a URI (its query, if any, kept last), with
    ``os.path.join`` for a local path."""
    if not is_uri(base):
        return os.path.join(base, *parts)
    head, sep, query = base.partition("?")
    path = "/".join([head.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return path + sep + query


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem ``location`` is on and its path there.

    A plain path (and ``file://``) is on the local filesystem, its path made absolute; ``s3``, ``gs``, ``hdfs``
    and ``abfs`` URIs get pyarrow's filesystem (settings from the environment); any other scheme fsspec knows
    gets fsspec's filesystem behind ``pyarrow.fs.PyFileSystem``.

    Raises:
        ValueError: the URI carries credentials, or its scheme is unknown to pyarrow and fsspec.
        OSError: the store could not be set up (e.g. the bucket's region could not be resolved); one line.
    """
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    _refuse_secrets(location)
    scheme = _scheme(location)
    if scheme in _NATIVE:
        parts = urlsplit(location)
        if scheme in ("s3", "gs", "gcs") and not parts.query:  # bucketed: one client per bucket and settings
            settings = tuple(os.environ.get(v) for v in ENVIRONMENT.get(_ALIASES.get(scheme, scheme), ()))
            with _remote_errors(location, "opening the store"):
                fs = _bucket_filesystem(scheme, parts.netloc, settings)
            return fs, f"{parts.netloc}{parts.path}".rstrip("/") or parts.netloc
        with _remote_errors(location, "opening the store"):
            return pafs.FileSystem.from_uri(location)
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, path = fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as e:
        raise ValueError(f"{display(location)}: no filesystem for scheme {scheme!r} (pyarrow has "
                         f"{', '.join(_NATIVE)}; fsspec: {e})") from None
    return PyFileSystem(FSSpecHandler(fs)), path


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, bucket: str, settings: tuple) -> "pafs.FileSystem":
    """pyarrow's filesystem of a bucket, made once per bucket and environment (``settings``: the values of the
    store's variables, so a changed environment gets a new client). Why: ``FileSystem.from_uri`` resolves an S3
    bucket's region with a request each time, and a reader opens a file per row group window."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def is_local(location: str) -> bool:
    """``location`` is on the local filesystem (a plain path or ``file://``)."""
    return not is_uri(location) or _scheme(location) == "file"


@contextlib.contextmanager
def _remote_errors(location: str, action: str) -> Iterator[None]:
    """Turn a store's error into one line naming ``location`` and the variables its client reads; a missing
    file stays a ``FileNotFoundError``."""
    import pyarrow as pa

    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        reason = " ".join(str(e).split())
        raise OSError(f"{display(location)}: {action} failed: {reason}; {_environment_hint(location)}") from None


def _guard(location: str, action: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if is_local(location) else _remote_errors(location, action)


def check_reachable(location: str) -> None:
    """Raise a one-line error if the store of ``location`` cannot be reached or its bucket does not exist.

    A missing bucket looks like an empty one to a listing, so a reader would report a missing file and a writer
    would fail at its first file: this says what is wrong before either. Nothing to check for a local path.
    """
    import pyarrow.fs as pafs

    if is_local(location):
        return
    fs, path = filesystem(location)
    if fs.type_name not in _BUCKETED:
        return
    bucket = path.strip("/").split("/", 1)[0]
    with _remote_errors(location, f"reading bucket {bucket!r}"):
        info = fs.get_file_info(bucket)
    if info.type == pafs.FileType.NotFound:
        raise OSError(f"{display(location)}: bucket {bucket!r} does not exist or these credentials cannot see it; "
                      f"{_environment_hint(location)}")


def exists(location: str) -> bool:
    """A file or a directory (on an object store: any object under the prefix) is at ``location``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    with _guard(location, "reading"):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    """A file (an object) is at ``location``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    with _guard(location, "reading"):
        return fs.get_file_info(path).type == pafs.FileType.File


def listdir(location: str, recursive: bool = False) -> list[str]:
    """Paths relative to ``location`` of what it holds (with ``recursive``: every file below it), sorted;
    empty if it does not exist."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    with _guard(location, "listing"):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    base = path.rstrip("/") + "/"
    return sorted(i.path[len(base):] if i.path.startswith(base) else i.base_name for i in infos
                  if not (recursive and i.type == pafs.FileType.Directory))


def some_files(location: str, depth: int = 2, limit: int = 1000) -> list[str]:
    """Paths relative to ``location`` of up to ``limit`` files at most ``depth`` levels below it: what a directory
    holds, without listing a large tree whole (someone's home directory, a bucket of logs)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    base, found, level = path.rstrip("/") + "/", [], [path]
    with _guard(location, "listing"):
        for _ in range(depth):
            below = []
            for folder in level:
                for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
                    if info.type == pafs.FileType.File:
                        found.append(info.path[len(base):])
                    elif info.type == pafs.FileType.Directory:
                        below.append(info.path)
                    if len(found) >= limit:
                        return sorted(found)
            level = below
    return sorted(found)


def read_bytes(location: str) -> bytes:
    """The whole file at ``location``."""
    fs, path = filesystem(location)
    with _guard(location, "reading"), fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(location: str, data: bytes) -> None:
    """Write ``data`` to ``location`` so a reader sees the old file or the new one whole.

    Locally: a temporary name in the same directory, then ``os.replace``. On an object store: one object write
    (an upload is invisible until it completes).
    """
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        return
    with _remote_errors(location, "writing"), fs.open_output_stream(path) as f:
        f.write(data)


def open_output(location: str) -> pa.NativeFile:
    """A stream writing the file ``location`` (parent directories created where the store has them)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    with _guard(location, "writing"):
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return fs.open_output_stream(path)


def remove_tree(location: str) -> None:
    """Delete ``location`` and everything below it, if it exists."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        shutil.rmtree(path, ignore_errors=True)
        return
    with _remote_errors(location, "deleting"):
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
        elif fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)


def remove_files(location: str, rel_paths: Iterable[str]) -> None:
    """Delete the files ``rel_paths`` under ``location`` (a missing one is fine)."""
    fs, path = filesystem(location)
    with _remote_errors(location, "deleting"):
        for rel in rel_paths:
            try:
                fs.delete_file(f"{path.rstrip('/')}/{rel}")
            except FileNotFoundError:
                pass


def upload(local_path: str, location: str) -> None:
    """Copy the local file ``local_path`` to ``location`` (one object write on a store: all of it or nothing)."""
    fs, path = filesystem(location)
    with _guard(location, "writing"), open(local_path, "rb") as src:
        if is_local(location):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with fs.open_output_stream(path) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def download(location: str, local_path: str) -> None:
    """Copy the file at ``location`` to ``local_path`` (a temporary name renamed into place)."""
    fs, path = filesystem(location)
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
    tmp = f"{local_path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _guard(location, "reading"), fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, local_path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


EXCLUSIVE_SCHEMES = ("s3", "s3a")  # stores whose conditional write (If-None-Match: *) makes an exclusive create


def create_exclusive(location: str, data: bytes) -> bool:
    """Create the file ``location`` holding ``data`` only if no file is there; returns whether it was created.

    Locally ``O_CREAT | O_EXCL``; on S3 a conditional write (``If-None-Match: *``, through s3fs's ``"xb"`` mode), so
    of two jobs racing for the same name exactly one succeeds, as with a local file.

    Raises:
        ValueError: the store offers no exclusive create here (naming what to use instead).
    """
    if is_local(location):
        fs, path = filesystem(location)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if _ALIASES.get(_scheme(location), _scheme(location)) != "s3":
        raise ValueError(f"{display(location)}: a run directory needs an exclusive create for its lock, which "
                         f"{_scheme(location)}:// does not offer here; use s3:// or a shared filesystem path")
    import fsspec

    _refuse_secrets(location)
    fs, path = fsspec.core.url_to_fs(location)
    with _remote_errors(location, "writing"):
        try:
            with fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:  # (s3fs: the store answered 412 Precondition Failed)
            return False
    return True


def modified(location: str) -> float | None:
    """The time ``location`` was last written (seconds since the epoch), or None if it does not exist."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    with _guard(location, "reading"):
        info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    return info.mtime.timestamp() if info.mtime is not None else None


class StagedDirectory:
    """A directory published whole: a reader sees the previous version or the new one, never part of one.

    **Locally** (a path or ``file://``) the files go into ``DIR.tmp-<pid>``, renamed into place by
    :meth:`publish` (:func:`mkt_torchrec.fsutil.replace_dir`: the old directory is removed only after the rename).
    **On an object store** there is no rename: the files go straight under the final prefix with names that carry
    this attempt's token (:meth:`name`), :meth:`publish` writes the marker last as one object (readers find a
    complete version through it), then deletes the previous version's files that the new marker does not
    reference and the files of attempts that were killed before publishing or aborting (names with another
    token; so two writers must not publish one prefix at once). :meth:`abort` deletes only the files carrying
    this attempt's token.

    Either way ``--overwrite`` never deletes what the tool did not write: ``final`` must be absent, empty, hold
    ``marker``, or (object store) hold only files of killed attempts. The object holds strings only, so it pickles: workers in other processes (Spark executors) write
    files with :meth:`open_output` and the driver calls :meth:`publish` or :meth:`abort`; every process reads
    the store's settings from its own environment.

    Args:
        final: the directory to publish (a path or URI).
        marker: the file that makes the directory what it is, written last (``manifest.json``).
        what: what the directory is, for errors (``"a dataset"``).
        overwrite: replace an existing ``final``; without it ``final`` must not exist.
        references: the relative paths of the files a marker's bytes reference (a module-level function, so the
            object pickles); on an object store :meth:`publish` deletes the previous marker's files that the new
            one does not reference. ``None``: delete nothing.

    Raises:
        FileExistsError: ``final`` exists and ``overwrite`` is false, or it holds something other than a
            directory with ``marker``.
        OSError: the store cannot be reached or the bucket does not exist (one line).

    Example:
        >>> staged = StagedDirectory("s3://bucket/ds", "manifest.json", "a dataset")   # doctest: +SKIP
        >>> with staged.open_output("train/part-00000.parquet") as f:                  # doctest: +SKIP
        ...     pq.write_table(table, f)
        >>> staged.publish(json.dumps({"files": [staged.name("train/part-00000.parquet")]}).encode())  # doctest: +SKIP
    """

    def __init__(self, final: str, marker: str, what: str, overwrite: bool = False,
                 references: Callable[[bytes], Iterable[str]] | None = None) -> None:
        self.final, self.marker, self.references = final, marker, references
        self.local = is_local(final)
        self.token = uuid.uuid4().hex[:12]
        check_reachable(final)
        if exists(final) and not overwrite:
            raise FileExistsError(f"{display(final)}: already exists (pass --overwrite to replace it)")
        if self.local:
            self._path = filesystem(final)[1]
            check_replaceable(self._path, (marker,), what)
            self.root = f"{self._path}.tmp-{os.getpid()}"
            shutil.rmtree(self.root, ignore_errors=True)
            os.makedirs(self.root)
        else:
            entries = listdir(final)
            if marker not in entries and not all(is_attempt_file(p) for p in some_files(final)):
                raise FileExistsError(f"{display(final)}: exists and is not {what} (it has no {marker}); refusing to "
                                      "replace it: choose another path or remove it yourself")
            self.root = final
        self._done = False

    def name(self, rel_path: str) -> str:
        """The relative path ``rel_path`` is written at (and the marker must reference): itself locally, with this
        attempt's token before its extension on an object store (``train/part-00000-mkt<token>.parquet``)."""
        if self.local:
            return rel_path
        head, _, base = rel_path.rpartition("/")
        stem, dot, ext = base.partition(".")
        named = f"{stem}-{_TOKEN_PREFIX}{self.token}{dot}{ext}"
        return f"{head}/{named}" if head else named

    def location(self, rel_path: str) -> str:
        """Where the file ``rel_path`` of this attempt is written (staging directory or final prefix)."""
        return join(self.root, self.name(rel_path))

    def open_output(self, rel_path: str) -> pa.NativeFile:
        """A stream writing the file ``rel_path`` (a relative path with ``/``); close it to finish the file."""
        return open_output(self.location(rel_path))

    def publish(self, data: bytes) -> None:
        """Write the marker with ``data`` and make this version the directory's content."""
        if self._done:
            raise RuntimeError(f"{display(self.final)}: already published or aborted")
        if self.local:
            with open(os.path.join(self.root, self.marker), "wb") as f:
                f.write(data)
            replace_dir(self.root, self._path)
        else:
            marker = join(self.final, self.marker)
            old = set(self.references(read_bytes(marker))) if self.references and is_file(marker) else set()
            write_bytes_atomic(marker, data)
            new = set(self.references(data)) if self.references else set()
            orphans = {p for p in listdir(self.final, recursive=True) if is_attempt_file(p)}  # interrupted attempts'
            remove_files(self.final, sorted((old | orphans) - new))
        self._done = True

    def abort(self) -> None:
        """Delete what this attempt wrote (a previous version stays as it was)."""
        self._done = True
        if self.local:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        mine = [p for p in listdir(self.final, recursive=True) if is_attempt_file(p, self.token)]
        remove_files(self.final, mine)
