"""Where a remote lives: a folder (a path, `file://`) or S3-compatible object storage.

A remote has the store's own layout (`FORMAT`, `HEAD`, `objects/ab/cdef…`, `refs/heads/…`,
`refs/tags/…`), so a folder remote is a valid bare store that `adb --store` opens, and an S3
prefix is the same tree as keys. A transport moves whole files by key and swaps refs with
compare-and-swap; everything above it (what to send, verification) is in `remote.py`.

Ref CAS: on a folder, the local store's own `RefStore.update` (flock on the remote's `lock`,
compare, reflog, rename). On S3, conditional writes: `If-Match: <ETag>` to move a ref,
`If-None-Match: *` to create one; the server refuses the write (412) when another push moved
the ref since it was read. Credentials come only from boto3's standard chain (environment,
profile, instance role): nothing here stores or prints them, and error messages carry the
server's error code, never its text (which may echo a key id).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from adapterdb.errors import AdbError, ConflictError, NotFoundError
from adapterdb.storage.objects import TMP_DIR, atomic_write
from adapterdb.storage.refs import OID_RE, RefStore
from adapterdb.storage.store import FORMAT

CHUNK = 1 << 20  # streamed in pieces of this size: never a whole object file at once on upload
_CONNECT_TIMEOUT, _READ_TIMEOUT, _ATTEMPTS = 5, 60, 3


class Transport(ABC):
    """Files of a remote store by key (`objects/ab/cd…`, `refs/heads/main`, `FORMAT`)."""

    url: str

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The file's bytes; `NotFoundError` if there is none."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store a local file under `key`, streamed; readers see all of it or nothing."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store small bytes (FORMAT, HEAD) under `key`."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under `prefix` (a folder-like `refs/heads/`), relative to the remote."""

    @abstractmethod
    def read_ref(self, ref: str) -> tuple[str | None, Any]:
        """(commit id or None, the token `swap_ref` compares against)."""

    @abstractmethod
    def swap_ref(self, ref: str, new: str, old: str | None, token: Any, message: str) -> None:
        """Move `ref` to `new` if it still is what `read_ref` returned; else `ConflictError`."""

    @abstractmethod
    def sync(self) -> None:
        """Make what `put_file` stored durable before a ref names it (a folder's fsyncs)."""

    def is_empty(self) -> bool:
        return not self.list("")

    def check_store(self, create: bool = False) -> None:
        """Refuse a location that is not an adb store; `create` starts one where it is empty
        (a first push into a new bucket prefix or an empty folder, as `git push` to a bare
        repository does not, but object storage has no `init`)."""
        try:
            text = self.get("FORMAT").decode("utf-8", "replace").strip()
        except NotFoundError:
            if create and self.is_empty():
                self.put_bytes("FORMAT", f"{FORMAT}\n".encode())
                self.put_bytes("HEAD", b"ref: refs/heads/main\n")
                return
            what = "is empty" if self.is_empty() else "holds files but no FORMAT"
            raise AdbError(
                f"{self.url} is not an adb store (it {what}); check the URL, or push to an "
                "empty location to start one"
            ) from None
        if text != FORMAT:
            raise AdbError(
                f"{self.url} is not a store this adb reads (FORMAT is {text[:40]!r}); "
                "check the URL or upgrade adapterdb"
            )

    def default_branch(self) -> str | None:
        """The branch the remote's HEAD names, if it names one."""
        with contextlib.suppress(NotFoundError):
            text = self.get("HEAD").decode("utf-8", "replace").strip()
            if text.startswith("ref: refs/heads/"):
                return text[len("ref: refs/heads/") :]
        return None


class FolderTransport(Transport):
    """A store folder on a local or network file system; writes are temp + fsync + rename."""

    def __init__(self, root: Path, url: str) -> None:
        self.root, self.url = root, url
        self._refs = RefStore(root, lambda oid: (root / "objects" / oid[:2] / oid[2:]).is_file())
        self._unsynced: set[Path] = set()
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(f"{key} is missing from the remote {self.url}") from None

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        with open(path, "rb") as f:
            chunks = iter(lambda: f.read(CHUNK), b"")
            atomic_write(target, chunks, tmp_dir=self.root / TMP_DIR, label="remote")
        with self._lock:
            self._unsynced.update((target.parent, target.parent.parent))

    def put_bytes(self, key: str, data: bytes) -> None:
        for sub in ("objects", "refs/heads", "refs/tags", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        atomic_write(self._path(key), [data], tmp_dir=self.root / TMP_DIR, label="remote")

    def sync(self) -> None:
        from adapterdb.durable import fsync_dir

        with self._lock:
            folders, self._unsynced = self._unsynced, set()
        for folder in sorted(folders, key=lambda p: -len(p.parts)):  # objects/ab before objects
            fsync_dir(folder, "remote")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def is_empty(self) -> bool:
        return not self.root.exists() or not any(self.root.iterdir())

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            (prefix + p.relative_to(base).as_posix())
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def read_ref(self, ref: str) -> tuple[str | None, Any]:
        value = self._refs.read(ref)
        return value, value

    def swap_ref(self, ref: str, new: str, old: str | None, token: Any, message: str) -> None:
        self._refs.update(ref, new, token, message)


class S3Transport(Transport):
    """`s3://bucket/prefix` on any S3-compatible server, through one thread-safe boto3 client."""

    def __init__(self, bucket: str, prefix: str, endpoint: str | None, url: str) -> None:
        self.bucket, self.url = bucket, url
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
        self.client = _s3_client(endpoint)

    def _key(self, key: str) -> str:
        return self.prefix + key

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """botocore's failures as one `AdbError` line: no traceback, no secret."""
        from botocore import exceptions as bx

        try:
            yield
        except bx.ClientError as exc:
            raise s3_error(exc, self.url, self.bucket, key) from None
        except bx.NoCredentialsError:
            raise AdbError(
                f"no S3 credentials for {self.url}; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            ) from None
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError) as exc:
            raise AdbError(
                f"cannot reach {self.endpoint} for {self.url} ({type(exc).__name__}); check "
                "--endpoint or AWS_ENDPOINT_URL and the network"
            ) from None
        except bx.BotoCoreError as exc:
            raise AdbError(f"S3 request for {self.url} failed: {type(exc).__name__}") from None

    def get(self, key: str) -> bytes:
        with self._errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            return body.read()

    def put_file(self, key: str, path: Path) -> None:
        with self._errors(key), open(path, "rb") as f:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=f)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def exists(self, key: str) -> bool:
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except NotFoundError:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        with self._errors(prefix or "/"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            )
            for page in pages:
                keys.extend(o["Key"][len(self.prefix) :] for o in page.get("Contents", []))
        return sorted(keys)

    def read_ref(self, ref: str) -> tuple[str | None, Any]:
        try:
            with self._errors(ref):
                got = self.client.get_object(Bucket=self.bucket, Key=self._key(ref))
                raw = got["Body"].read()
        except NotFoundError:
            return None, None
        value = raw.decode("latin-1").strip()
        if not OID_RE.fullmatch(value):
            raise AdbError(f"ref {ref} on {self.url} holds {value[:24]!r}, not a commit id")
        return value, got["ETag"]

    def sync(self) -> None:
        """Nothing to do: S3 acknowledges a PUT once it is durable."""

    def swap_ref(self, ref: str, new: str, old: str | None, token: Any, message: str) -> None:
        cond = {"IfMatch": token} if token else {"IfNoneMatch": "*"}
        try:
            with self._errors(ref):
                self.client.put_object(
                    Bucket=self.bucket, Key=self._key(ref), Body=f"{new}\n".encode(), **cond
                )
        except ConflictError:
            raise ConflictError(
                f"{ref} on {self.url} moved while this push ran (expected "
                f"{(old or 'nothing')[:12]})"
            ) from None


_LOADER: list[Any] = []  # botocore's data loader, shared: its JSON models load once
_LOADER_LOCK = threading.Lock()


_CLIENTS: dict[tuple[str | None, str], Any] = {}  # (endpoint, digest of AWS_* settings)


def _s3_client(endpoint: str | None) -> Any:
    """The process's boto3 client for `endpoint` and the current AWS_* environment: a new one
    costs 0.03-0.06 s (session handlers, endpoint rules), and a lazy clone would make three
    (the clone's, its fetch's, its on-demand reads'). Keyed by a digest of the AWS_* variables,
    so changed credentials or settings get a new client and no secret is kept as a key."""
    import boto3
    from botocore.config import Config

    settings = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    key = (endpoint, hashlib.sha256(repr(settings).encode()).hexdigest())
    with _LOADER_LOCK:
        if key in _CLIENTS:
            return _CLIENTS[key]
    config = Config(
        connect_timeout=_CONNECT_TIMEOUT,
        read_timeout=_READ_TIMEOUT,
        retries={"max_attempts": _ATTEMPTS, "mode": "standard"},
        max_pool_connections=64,
    )
    session = boto3.session.Session(botocore_session=_botocore_session())
    try:
        client = session.client("s3", endpoint_url=endpoint, config=config)
    except ValueError as exc:  # botocore: "Invalid endpoint: ..." (AWS_ENDPOINT_URL or --endpoint)
        raise AdbError(
            f"the S3 endpoint is not a URL ({exc}); pass --endpoint http(s)://HOST:PORT or fix "
            "AWS_ENDPOINT_URL"
        ) from None
    with _LOADER_LOCK:
        return _CLIENTS.setdefault(key, client)


def _botocore_session() -> Any:
    """A fresh botocore session (credentials and settings read anew from the environment)
    that shares one data loader: each new session otherwise parses ~10 MB of service model
    JSON again, 0.1-0.4 s per remote opened."""
    import botocore.session

    session = botocore.session.get_session()
    with _LOADER_LOCK:
        if _LOADER:
            session.register_component("data_loader", _LOADER[0])
        else:
            _LOADER.append(session.get_component("data_loader"))
    return session


def s3_error(exc: Any, url: str, bucket: str, key: str) -> AdbError:
    """One line for an S3 error response, by its code (the message text is never shown)."""
    err = exc.response.get("Error", {})
    code = str(err.get("Code", "?"))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in ("NoSuchKey", "404", "NotFound"):
        return NotFoundError(f"{key} is missing from the remote {url}")
    if code == "NoSuchBucket":
        return AdbError(f"bucket '{bucket}' does not exist ({url}); create it or fix the URL")
    if code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status in (409, 412):
        return ConflictError(f"{key} on {url} changed during this command ({code})")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
        return AdbError(
            f"the S3 server refused the credentials for {url} ({code}); check "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    return AdbError(f"S3 error {code} on {url} ({key}); run again or check the server")


def open_transport(url: str, endpoint: str | None = None) -> Transport:
    """A transport for a remote URL: `s3://bucket/prefix`, `file:///path`, or a folder path."""
    parsed = urlparse(url)
    if "@" in parsed.netloc:  # the URL is stored and printed: a key in it would leak
        raise AdbError(
            "credentials in a remote URL are not accepted (it is stored and shown); use "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise AdbError(f"{url!r} names no bucket; use s3://BUCKET/PREFIX")
        return S3Transport(parsed.netloc, parsed.path, endpoint, url)
    if endpoint:
        raise AdbError("--endpoint is for s3:// remotes; a folder remote takes no endpoint")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise AdbError(
                f"{url!r} names host {parsed.netloc!r}; a file URL is file:///absolute/path "
                "(three slashes), or pass the folder path itself"
            )
        return FolderTransport(Path(unquote(parsed.path)), url)
    if parsed.scheme and len(parsed.scheme) > 1:  # 'c:' would be a drive, not a scheme
        raise AdbError(
            f"{url!r}: '{parsed.scheme}://' remotes are not supported; use a folder path, "
            "file:///path or s3://bucket/prefix"
        )
    return FolderTransport(Path(url), url)
