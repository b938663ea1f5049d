"""The SDK packs a PEFT folder into the same bytes every time, so a retried upload is the same import."""

from __future__ import annotations

import gzip
import io
import tarfile
from itertools import count
from pathlib import Path

import pytest

from lorafleet.sdk.calls import pack_adapter_folder


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
