"""Worker keys (made once, private, reused) and the per-job PRF seeds derived from them."""
from __future__ import annotations

import base64
import os
import stat

import pytest

from services.worker.keys import KeyFileError, WorkerKeys, ed25519_public_from_b64, x25519_public_from_b64
from services.worker.seeds import own_seed, pair_seed


def test_keys_are_made_once_with_private_modes(tmp_path):
    state = tmp_path / "state"
    keys = WorkerKeys.load_or_create(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = sorted(os.listdir(state))
    assert files == ["encryption_key.pem", "signing_key.pem"]
    for name in files:
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    again = WorkerKeys.load_or_create(state)
    assert again.public_keys() == keys.public_keys()


def test_public_keys_are_base64_raw_32_bytes(tmp_path):
    keys = WorkerKeys.load_or_create(tmp_path / "s")
    body = keys.public_keys()
    assert set(body) == {"encryption_public_key", "signing_public_key"}
    for value in body.values():
        assert len(base64.b64decode(value)) == 32
    assert x25519_public_from_b64(body["encryption_public_key"])
    assert ed25519_public_from_b64(body["signing_public_key"])
    assert "PRIVATE" not in repr(keys)


def test_a_loose_state_dir_is_tightened(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    WorkerKeys.load_or_create(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_a_key_readable_by_others_is_refused(tmp_path):
    state = tmp_path / "state"
    WorkerKeys.load_or_create(state)
    os.chmod(state / "signing_key.pem", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        WorkerKeys.load_or_create(state)


def test_a_garbage_key_file_is_explained(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    fd = os.open(state / "encryption_key.pem", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(KeyFileError, match="not a readable private key"):
        WorkerKeys.load_or_create(state)


def test_bad_public_keys_are_refused():
    with pytest.raises(KeyFileError, match="32 bytes"):
        x25519_public_from_b64(base64.b64encode(b"short").decode())
    with pytest.raises(KeyFileError, match="base64"):
        ed25519_public_from_b64("***")


def test_pair_seeds_agree_between_the_two_parties_and_differ_per_job(tmp_path):
    a = WorkerKeys.load_or_create(tmp_path / "a").encryption
    b = WorkerKeys.load_or_create(tmp_path / "b").encryption
    c = WorkerKeys.load_or_create(tmp_path / "c").encryption
    ab = pair_seed(a, b.public_key(), "job1", 0, 1)
    assert ab == pair_seed(b, a.public_key(), "job1", 1, 0)
    assert len(ab) == 32
    assert ab != pair_seed(a, b.public_key(), "job2", 0, 1)
    assert ab != pair_seed(a, c.public_key(), "job1", 0, 2)
    assert ab != pair_seed(a, b.public_key(), "job1", 0, 2)  # the seats are bound too
    with pytest.raises(ValueError):
        pair_seed(a, b.public_key(), "job1", 1, 1)


def test_own_seed_is_private_and_per_job(tmp_path):
    a = WorkerKeys.load_or_create(tmp_path / "a").encryption
    b = WorkerKeys.load_or_create(tmp_path / "b").encryption
    assert own_seed(a, "job1", 0) == own_seed(a, "job1", 0)
    assert own_seed(a, "job1", 0) != own_seed(a, "job2", 0)
    assert own_seed(a, "job1", 0) != own_seed(b, "job1", 0)
