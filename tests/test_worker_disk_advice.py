"""A refused write's advice follows the refusal: a full volume needs room, not the permissions it already has."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from services.worker.checks import check_directory
from services.worker.config import WorkerConfig, parse_bucket
from services.worker.disk_advice import disk_advice
from services.worker.uploader import ModelStore, UploadError


def refusing(code: int):
    def write(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return write


def test_the_advice_for_a_full_disk_is_room_and_for_a_read_only_one_permissions():
    assert disk_advice(OSError(errno.ENOSPC, "x"), "CAPE_SPOOL_DIR") == "free space on the volume of CAPE_SPOOL_DIR"
    assert disk_advice(OSError(errno.EDQUOT, "x"), "CAPE_SPOOL_DIR") == "free space on the volume of CAPE_SPOOL_DIR"
    assert disk_advice(OSError(errno.EROFS, "x"), "CAPE_SPOOL_DIR") == "make CAPE_SPOOL_DIR writable by this worker"


def test_check_says_a_full_state_volume_needs_room(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_bytes", refusing(errno.ENOSPC))
    result = check_directory("state", tmp_path, "CAPE_STATE_DIR")
    assert (result.ok, result.detail) == (False, f"{tmp_path} takes no new file (No space left on device); free "
                                                  "space on the volume of CAPE_STATE_DIR")
    monkeypatch.setattr(Path, "write_bytes", refusing(errno.EROFS))
    assert check_directory("state", tmp_path, "CAPE_STATE_DIR").detail == (
        f"{tmp_path} is not writable (Read-only file system); point CAPE_STATE_DIR at a writable directory (a volume)")


@pytest.mark.parametrize("code, advice", [(errno.ENOSPC, "free space on the volume of the directory of CAPE_BUCKET"),
                                          (errno.EACCES, "make the directory of CAPE_BUCKET")])
def test_a_file_bucket_that_refuses_the_model_says_what_to_do(tmp_path, monkeypatch, code, advice):
    from services.worker import uploader

    config = WorkerConfig.from_env({"CAPE_TOKEN": "tok,c2VjcmV0", "CAPE_COORDINATOR": "http://127.0.0.1:1",
                                    "CAPE_SPOOL_DIR": str(tmp_path / "spool"), "CAPE_STATE_DIR": str(tmp_path / "st")})
    monkeypatch.setattr(uploader, "atomic_write_bytes", refusing(code))
    with pytest.raises(UploadError) as caught:
        ModelStore(config).put_bytes(parse_bucket(f"file://{tmp_path}/bucket"), "job1/metrics.json", b"{}", tmp_path)
    assert f"cannot write {tmp_path}/bucket/job1/metrics.json: {os.strerror(code)}; {advice}" in str(caught.value)
