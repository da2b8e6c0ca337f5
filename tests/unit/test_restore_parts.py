"""The pure parts of bringing servers back (service/restore.py): what a fd store gave back
is sorted by server and checked for its kind; a kept Connector whose anchor is gone is
recognised."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from xdg_containers.service.restore import anchor_gone, kept_from_store

PREFIX = "/org/freedesktop/DBus/Containers1/c"


def test_kept_fds_are_sorted_by_server_and_checked_for_their_kind(tmp_path: Path) -> None:
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(tmp_path / "s"))
    listening.listen(1)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    wrong = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # not listening
    inherited = {
        "c3.listen": listening.detach(), "c3.connector": ours.detach(), "c3.notify": r,
        "c4.listen": wrong.detach(), "junk": os.dup(w), "c01.listen": os.dup(w),
    }
    kept, stray = kept_from_store(inherited)
    assert sorted(stray) == ["c01.listen", "c4.listen", "junk"]
    assert set(kept) == {PREFIX + "3", PREFIX + "4"}
    three = kept[PREFIX + "3"]
    assert three.listen is not None and three.connector is not None and three.notify_fd == r
    assert kept[PREFIX + "4"].listen is None
    for k in kept.values():
        k.close()
    theirs.close()
    os.close(w)


def test_a_connector_whose_anchor_is_gone_isanchor_gone() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert not anchor_gone(ours)
    theirs.close()
    assert anchor_gone(ours)
    ours.close()
