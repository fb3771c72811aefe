"""Secrets on disk: private keys are created exclusively with mode 0600 (never through a symlink, never over an
existing file unless forced), and a run directory and its SQLite files are readable by their owner only."""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedlearn import RunStore
from fedlearn.cli import main as fedlearn_main
from fedlearn.transport import certs
from fedlearn.transport.identity import Identity, IdentityError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_key_is_0600_whatever_the_umask(tmp_path):
    with umask(0):
        Identity.generate().save(tmp_path / "identity.key")
    assert mode(tmp_path / "identity.key") == 0o600


def test_an_existing_0644_file_is_neither_written_nor_kept_readable(tmp_path):
    path = tmp_path / "identity.key"
    path.write_text("someone else's file\n")
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="already exists; refusing to overwrite"):
        Identity.generate().save(path)
    assert path.read_text() == "someone else's file\n" and mode(path) == 0o644  # untouched
    identity = Identity.generate()
    identity.save(path, force=True)
    assert mode(path) == 0o600 and Identity.load(path).public_hex == identity.public_hex


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlink_is_never_written_through(tmp_path, dangling):
    target = tmp_path / "elsewhere" / "authorized_keys"
    target.parent.mkdir()
    if not dangling:
        target.write_text("precious\n")
    link = tmp_path / "identity.key"
    link.symlink_to(target)
    with pytest.raises(IdentityError, match="already exists"):
        Identity.generate().save(link)
    Identity.generate().save(link, force=True)  # replaces the link itself
    assert not link.is_symlink() and mode(link) == 0o600
    assert target.read_text() == "precious\n" if not dangling else not target.exists()


def test_cli_refuses_to_replace_an_identity_unless_forced(tmp_path, capsys):
    folder = tmp_path / "lab"
    assert fedlearn_main(["certs", "--identity-only", "--client", "lab", "--out", str(folder)]) == 0
    key = (folder / "identity.key").read_bytes()
    assert fedlearn_main(["certs", "--identity-only", "--client", "lab", "--out", str(folder)]) != 0
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (folder / "identity.key").read_bytes() == key
    assert fedlearn_main(["certs", "--identity-only", "--client", "lab", "--out", str(folder), "--force"]) == 0
    assert (folder / "identity.key").read_bytes() != key and mode(folder / "identity.key") == 0o600


def test_credentials_folder_keeps_every_secret_private(tmp_path):
    out = tmp_path / "creds"
    with umask(0o022):
        certs.create(out, ["a"])
    secrets = [out / "ca.key", out / "server.key", out / "operator.token", out / "clients/a/identity.key",
               out / "clients/a/client.key"]
    assert [mode(p) for p in secrets] == [0o600] * len(secrets)
    stray = out / "clients" / "b" / "identity.key"  # left behind by an interrupted run
    stray.parent.mkdir()
    stray.write_text("stray")
    with pytest.raises(IdentityError, match="already exists"):
        certs.create(out, ["b"])
    certs.create(out, ["b"], force=True)
    assert mode(stray) == 0o600 and Identity.load(stray)


def test_run_directory_and_its_database_files_are_owner_only(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    with umask(0o022):
        store = RunStore(run_dir)
        store.set_meta("k", 1)  # a write: SQLite creates the WAL and shared-memory files
        files = [run_dir / n for n in ("run.sqlite", "run.sqlite-wal", "run.sqlite-shm")]
        assert all(f.exists() for f in files)
        assert mode(run_dir) == 0o700 and [mode(f) for f in files] == [0o600] * 3
        store.close()


def test_an_existing_readable_database_is_made_owner_only_and_a_symlink_refused(tmp_path):
    run_dir = tmp_path / "r"
    RunStore(run_dir).close()
    (run_dir / "run.sqlite").chmod(0o644)
    RunStore(run_dir).close()
    assert mode(run_dir / "run.sqlite") == 0o600
    other = tmp_path / "o"
    other.mkdir()
    (other / "run.sqlite").symlink_to(run_dir / "run.sqlite")
    with pytest.raises(OSError):
        RunStore(other)
