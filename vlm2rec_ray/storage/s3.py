"""S3 and S3-compatible stores (MinIO, moto, Ceph) through boto3, and pyarrow's S3 filesystem for table reads.

The endpoint comes from the config (``storage.endpoint_url``) or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
credentials from the SDKs' standard chains (environment, profile, instance role). boto3 clients use adaptive
retries and bounded timeouts, their retries counted (:mod:`.retries`). Uploads are ``upload_file`` with a
``TransferConfig``: one PUT up to 16 MiB, else a multipart upload of 16 MiB parts, 4 in flight, aborted on
failure (s3transfer), so an object appears only whole.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from vlm2rec_ray.storage import retries
from vlm2rec_ray.storage.base import Backend, StorageError, storage_errors

if TYPE_CHECKING:
    import pyarrow.fs

PART_BYTES = 16 << 20
UPLOAD_THREADS = 4
_CLIENTS: dict[tuple[str | None, int, float], Any] = {}
_LOCK = threading.Lock()


def endpoint_url(explicit: str | None = None) -> str | None:
    """The S3 endpoint: the explicit config value, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_client(endpoint: str | None = None, max_attempts: int = 8, timeout_s: float = 30.0) -> Any:
    """A cached boto3 S3 client with adaptive retries, bounded timeouts and its retries counted."""
    import boto3
    from botocore.config import Config

    ep = endpoint_url(endpoint)
    with _LOCK:
        client = _CLIENTS.get((ep, max_attempts, timeout_s))
        if client is None:
            cfg = Config(retries={"max_attempts": max_attempts, "mode": "adaptive"}, connect_timeout=min(timeout_s, 10.0),
                         read_timeout=timeout_s, max_pool_connections=32,
                         user_agent_extra=f"vlm2rec-pid/{os.getpid()}")  # which process asked (access logs)
            client = boto3.session.Session().client("s3", endpoint_url=ep, config=cfg, region_name=_region())
            client.meta.events.register("request-created.s3", retries.count_retry, unique_id="vlm2rec-retries")
            _CLIENTS[(ep, max_attempts, timeout_s)] = client
    return client


def split(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``.

    Raises:
        ValueError: not an s3:// URI, or no valid bucket name.
    """
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}; expected s3://<bucket>/<key>")
    bucket, _, key = uri[5:].partition("/")
    if len(bucket) < 3:
        raise ValueError(f"invalid S3 bucket in {uri!r}: bucket names have 3-63 characters")
    return bucket, key


class S3Backend(Backend):
    """S3: pyarrow's S3FileSystem for tables, listings and deletes; boto3 (one cached client per endpoint, its
    retries counted) for reads, writes and transfers."""

    prefix = "s3://"

    @property
    def client(self) -> Any:
        return s3_client(self.endpoint)

    def check(self, uri: str) -> None:
        split(uri)

    def read(self, uri: str, max_bytes: int | None = None) -> bytes:
        bucket, key = split(uri)
        if not key or key.endswith("/"):
            raise StorageError(f"{uri} names a bucket or prefix, not an object", reason="missing")
        with storage_errors(uri, Exception):  # one GET: the size cap reads Content-Length before the body
            resp = self.client.get_object(Bucket=bucket, Key=key)
            if max_bytes is not None and int(resp.get("ContentLength", -1)) > max_bytes:
                resp["Body"].close()
                raise StorageError(f"{uri} is {resp['ContentLength']} bytes, over the cap of {max_bytes}", "too_large")
            return resp["Body"].read()

    @contextlib.contextmanager
    def open(self, uri: str) -> Iterator[BinaryIO]:
        bucket, key = split(uri)
        with storage_errors(uri, Exception):
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
        with contextlib.closing(body):
            yield body

    def write(self, uri: str, data: bytes) -> None:
        bucket, key = split(uri)
        with storage_errors(uri, Exception):
            self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def upload(self, path: str, uri: str) -> None:
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=UPLOAD_THREADS)
        with storage_errors(uri, Exception):
            self.client.upload_file(str(path), *split(uri), Config=cfg)

    def download(self, uri: str, path: str) -> None:
        with storage_errors(uri, Exception):
            self.client.download_file(*split(uri), str(path))

    def filesystem(self, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
        """pyarrow's S3 filesystem (its own AWS SDK client: standard retries, not counted) and ``bucket/key``."""
        import pyarrow.fs as pafs

        bucket, key = split(uri)
        kwargs: dict[str, Any] = {"region": _region(), "connect_timeout": 10, "request_timeout": 60,
                                  "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=8)}
        if endpoint_url(self.endpoint):
            scheme, _, hostport = endpoint_url(self.endpoint).partition("://")  # type: ignore[union-attr]
            kwargs.update(endpoint_override=hostport.rstrip("/"), scheme=scheme)
        return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


__all__ = ["S3Backend", "endpoint_url", "s3_client", "split"]
