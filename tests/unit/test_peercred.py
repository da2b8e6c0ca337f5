"""Tests for peer credentials: what is read at accept, what ``complete`` adds, once."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from xdg_containers.io.peercred import read_peer_credentials


@pytest.fixture
def sock() -> Iterator[socket.socket]:
    """One end of a connected unix socket pair (this process on both ends)."""
    a, b = socket.socketpair()
    yield a
    a.close()
    b.close()


def test_accept_time_read_leaves_groups_and_label_for_complete(sock: socket.socket) -> None:
    creds = read_peer_credentials(sock, complete=False)
    assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert not creds.completed and creds.groups == [] and creds.security_label is None
    creds.complete(sock)
    assert creds.completed
    assert set(creds.groups) == set(os.getgroups())
    first = list(creds.groups)
    creds.groups = ["sentinel"]  # type: ignore[list-item]
    creds.complete(sock)  # once only: a second call reads nothing
    assert creds.groups == ["sentinel"]
    creds.groups = first
    creds.close()


def test_full_read_matches_a_completed_one(sock: socket.socket) -> None:
    full = read_peer_credentials(sock)
    late = read_peer_credentials(sock, complete=False)
    late.complete(sock)
    assert full.completed
    assert (full.groups, full.security_label) == (late.groups, late.security_label)
    full.close()
    late.close()


def test_the_pidfd_is_not_inherited_by_children(sock: socket.socket) -> None:
    # No set_inheritable call any more: the kernel makes SO_PEERPIDFD close-on-exec.
    creds = read_peer_credentials(sock, complete=False)
    if creds.pidfd is None:
        pytest.skip("kernel without SO_PEERPIDFD (< 6.5)")
    assert not os.get_inheritable(creds.pidfd)
    creds.close()
    assert creds.pidfd is None
