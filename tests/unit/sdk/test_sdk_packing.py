"""The SDK packs a PEFT folder into the same bytes every time, so a retried upload is the same import."""

from __future__ import annotations

import gzip
import io
import tarfile
from itertools import count
from pathlib import Path

import pytest

from lorafleet.errors import PayloadTooLargeError, ValidationError
from lorafleet.sdk.calls import adapter_archive, pack_adapter_folder


def test_a_folder_packs_to_the_same_bytes_whatever_the_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "adapter_config.json").write_text('{"r": 2}', encoding="utf-8")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    clock = count(1_700_000_000, 3600)  # an hour between calls: gzip would stamp each header differently
    monkeypatch.setattr(gzip.time, "time", lambda: float(next(clock)))
    first, second = pack_adapter_folder(tmp_path), pack_adapter_folder(tmp_path)
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first), mode="r:gz") as tar:
        assert tar.getnames() == ["adapter_config.json", "adapter_model.safetensors"]
        assert all(m.mtime == 0 for m in tar.getmembers())


def test_an_archive_source_must_be_a_regular_file_within_the_cap(tmp_path: Path) -> None:
    """``/dev/zero`` (a device: it never ends) and a file over the cap are refused without reading them whole
    (finding 8 of issue 18)."""
    with pytest.raises(ValidationError, match="not a regular file"):
        adapter_archive("/dev/zero")
    big = tmp_path / "big.tgz"
    big.write_bytes(b"\x1f\x8b" + bytes(4096))
    with pytest.raises(PayloadTooLargeError, match="import cap of 1024 bytes"):
        adapter_archive(big, max_bytes=1024)
    assert adapter_archive(big) == big.read_bytes()
