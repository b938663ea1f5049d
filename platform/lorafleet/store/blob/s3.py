"""The object store on S3 (boto3; AWS or any S3-compatible endpoint such as MinIO or moto).

Keys are ``<prefix>/sha256/ab/<hex>``. A put asks ``head_object`` first and skips a blob that is present; the
write itself is conditional (``If-None-Match: *``), so a racing writer cannot overwrite either. Small blobs
go up in one ``put_object``, large ones as a multipart upload that is aborted on any failure; both carry a
``ChecksumSHA256`` so the server can reject damaged uploads. Reads stream and verify sha256 and size.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from lorafleet.errors import BlobNotFoundError, BlobStoreError, ConfigError
from lorafleet.store.blob.base import (
    CHUNK,
    BlobBackend,
    BlobInfo,
    DigestCheck,
    blob_key,
    is_digest,
    iter_chunks,
    read_verified,
    write_verified,
)

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
MAX_PARTS = 10_000  # S3's ceiling on parts per upload
_MISSING = {"NoSuchKey", "404", "NotFound"}
_ALREADY_WRITTEN = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}

S3Client = Any  # boto3's client class is generated at run time


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_attempts: int = 5,
) -> S3Client:
    """A boto3 S3 client with bounded timeouts and retries (path-style addressing on custom endpoints).

    ``max_attempts`` counts the first try, so 1 means no retries.
    """
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url else None,
        # We send our own SHA256 checksums; botocore's default CRC32 trailers trip up some S3-compatible servers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


class S3BlobStore(BlobBackend):
    """Content-addressed blobs in an S3 bucket below a key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: S3Client | None = None,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        multipart_threshold: int = 8 * MiB,
        part_size: int = 8 * MiB,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
    ) -> None:
        if not bucket:
            raise ConfigError("S3 object store needs a bucket name")
        if part_size < MIN_PART_SIZE:
            raise ConfigError(f"S3 part_size must be at least {MIN_PART_SIZE} bytes, got {part_size}")
        if multipart_threshold < 1:
            raise ConfigError(f"S3 multipart_threshold must be positive, got {multipart_threshold}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._client = client or make_s3_client(
            endpoint_url=endpoint_url,
            region=region,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
        )

    def __repr__(self) -> str:
        return f"S3BlobStore({self.bucket!r}, {self.prefix!r})"

    def key_for(self, sha256: str) -> str:
        """The object key a digest is stored under."""
        key = blob_key(sha256)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key_for(sha256)}"

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Translate botocore failures into ``BlobNotFoundError`` / ``BlobStoreError`` naming the object."""
        uri = f"s3://{self.bucket}/{key}"
        try:
            yield
        except ClientError as exc:
            code = _error_code(exc)
            if code in _MISSING:
                raise BlobNotFoundError(f"no blob at {uri}") from exc
            raise BlobStoreError(f"S3 {action} {uri} failed: {exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise BlobStoreError(f"S3 {action} {uri} failed: {exc}") from exc

    # --- writing -----------------------------------------------------------------------------------------
    @contextmanager
    def _reading(self, path: Path) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise BlobStoreError(f"cannot read {path}: {exc}") from exc

    def _write(self, sha256: str, size: int, open_source: Callable[[], BinaryIO], *, source: str) -> None:
        """Write the object unless it appears meanwhile; the source is re-verified as it is read."""
        key = self.key_for(sha256)
        check = DigestCheck(sha256, size)
        where = f"from {source} (changed while being stored?)"
        with self._errors("upload", key), open_source() as stream:
            try:
                if size < self.multipart_threshold:
                    data = read_verified(iter_chunks(stream), check, where)
                    self._client.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=data,
                        ContentLength=size,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=_b64(bytes.fromhex(sha256)),
                        IfNoneMatch="*",
                    )
                else:
                    self._upload_multipart(key, stream, check, where)
            except ClientError as exc:
                if _error_code(exc) not in _ALREADY_WRITTEN:  # someone wrote the same bytes meanwhile
                    raise

    def _upload_multipart(self, key: str, stream: BinaryIO, check: DigestCheck, where: str) -> None:
        """Upload in parts with per-part SHA256 checksums; abort the upload on any failure."""
        part_size = max(self.part_size, math.ceil((check.expected_size or 0) / MAX_PARTS))
        created = self._client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256"
        )
        upload_id = created["UploadId"]
        try:
            parts = []
            for number, chunk in enumerate(iter_chunks(stream, part_size), start=1):
                check.update(chunk)
                part_checksum = _b64(hashlib.sha256(chunk).digest())
                uploaded = self._client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=chunk,
                    ChecksumSHA256=part_checksum,
                )
                parts.append(
                    {"PartNumber": number, "ETag": uploaded["ETag"], "ChecksumSHA256": part_checksum}
                )
            check.verify(where)
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except BaseException:
            with suppress(ClientError, BotoCoreError):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    # --- reading -----------------------------------------------------------------------------------------
    def get_bytes(self, sha256: str, *, expected_size: int | None = None) -> bytes:
        key = self.key_for(sha256)
        with self._errors("read", key), self._body(key) as body:
            return read_verified(
                body.iter_chunks(CHUNK), DigestCheck(sha256, expected_size), self.uri_for(sha256)
            )

    def download(self, sha256: str, dest: Path, *, expected_size: int | None = None) -> Path:
        key = self.key_for(sha256)
        check = DigestCheck(sha256, expected_size)
        with self._errors(f"download to {dest} from", key), self._body(key) as body:
            return write_verified(body.iter_chunks(CHUNK), dest, check, self.uri_for(sha256))

    @contextmanager
    def _body(self, key: str) -> Iterator[Any]:
        """The streaming body of ``get_object``, closed afterwards."""
        body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
        try:
            yield body
        finally:
            body.close()

    def exists(self, sha256: str) -> bool:
        key = self.key_for(sha256)
        try:
            with self._errors("head", key):
                self._client.head_object(Bucket=self.bucket, Key=key)
        except BlobNotFoundError:
            return False
        return True

    def _list(self, prefix: str) -> Iterator[BlobInfo]:
        root = f"{self.prefix}/sha256/" if self.prefix else "sha256/"
        search = root + (f"{prefix[:2]}/{prefix}" if len(prefix) >= 2 else prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors("list", search + "*"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=search):
                for obj in page.get("Contents", []):
                    name = obj["Key"].rsplit("/", 1)[-1]
                    if is_digest(name) and name.startswith(prefix) and obj["Key"] == self.key_for(name):
                        yield BlobInfo(
                            sha256=name,
                            size=int(obj["Size"]),
                            modified_at=obj["LastModified"].astimezone(UTC),
                        )

    # --- deleting ----------------------------------------------------------------------------------------
    def delete(self, sha256: str) -> None:
        key = self.key_for(sha256)
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=key)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
