"""The Ray token of a local cluster is readable by its owner only."""

from __future__ import annotations

import stat

import pytest

from attribution.distributed.cluster import default_token_path, private_token_file


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    return tmp_path


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_missing_token_is_created_private(home):
    private_token_file()
    token = default_token_path()
    assert token == home / ".ray" / "auth_token"
    assert mode(token) == 0o600 and len(token.read_text().strip()) >= 32


def test_a_world_readable_token_is_tightened_and_kept(home):
    token = home / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("a" * 64)
    token.chmod(0o644)
    private_token_file()
    assert mode(token) == 0o600 and token.read_text() == "a" * 64


def test_a_token_the_user_points_to_is_left_alone(home, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(home / "elsewhere"))
    private_token_file()
    assert not default_token_path().exists()
