"""Anchors the service starts itself, forked from a small zygote in bubblewrap (SPEC 10).

One zygote per identity kind (``/.flatpak-info`` or ``/.xdg-containers-info``)
runs the anchor program's ``zygote`` (binary.py: the C one, else program.py)
inside bwrap: the host read-only, an empty placeholder for the identity
file, CAP_SYS_ADMIN kept. For each server it
forks a child that enters a mount namespace of its own, binds the server's
identity file over the placeholder and serves the Connector protocol. A child
shares the zygote's pages, so an anchor costs tens of KiB, and creating one
costs a fork, not a bwrap and an interpreter start-up.

No bwrap, or a bwrap that cannot start: ``AnchorStartError`` with the reason
(AddServer answers ``Failed``); never a fallback to the service's own pid.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile

from xdg_containers.anchor.binary import anchor_command, describe
from xdg_containers.anchor.sandbox import identity_kind, identity_text, zygote_argv
from xdg_containers.io.anchor_link import AnchorLink

log = logging.getLogger(__name__)

#: Seconds the zygote may take to start (bwrap plus a bare interpreter: ~25 ms here).
START_TIMEOUT = 10.0
#: Seconds one fork may take.
FORK_TIMEOUT = 5.0


class AnchorStartError(Exception):
    """No anchor could be started; the text says why (becomes Failed)."""


class _Zygote:
    """One running zygote: its process and the control socket, one request at a time."""

    def __init__(self, proc: subprocess.Popen[bytes], ctl: socket.socket) -> None:
        self.proc = proc
        self.ctl = ctl
        self.lock = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and self.ctl.fileno() >= 0

    def close(self) -> None:
        self.ctl.close()
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class AnchorFactory:
    """Starts (and reaps, through the zygotes) the anchors of servers without a Connector."""

    def __init__(self, loop: asyncio.AbstractEventLoop, bwrap: str | None = None) -> None:
        """Nothing starts until the first anchor is asked for."""
        self.loop = loop
        self._bwrap = bwrap
        self._zygotes: dict[str, _Zygote] = {}
        self._starting: dict[str, asyncio.Lock] = {}

    async def start_anchor(self, container_type: str, app_id: str, instance_id: str) -> AnchorLink:
        """A new anchor for one server, connected to us through a fresh Connector."""
        kind = identity_kind(container_type)
        zygote = await self._zygote(kind)
        identity = identity_text(container_type, app_id, instance_id).encode("utf-8")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            async with zygote.lock:
                pid = await self._fork(zygote, identity, theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return AnchorLink(self.loop, ours, pid=pid)

    async def _fork(self, zygote: _Zygote, identity: bytes, theirs: socket.socket) -> int:
        ctl = zygote.ctl
        try:
            fds = array.array("i", [theirs.fileno()]).tobytes()
            ctl.sendmsg([identity], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            answer = await asyncio.wait_for(self._recv(ctl), FORK_TIMEOUT)
        except (TimeoutError, OSError) as exc:
            zygote.close()
            raise AnchorStartError(f"the anchor zygote failed: {exc or 'timeout'}") from exc
        if answer[:1] == b"\x00":
            return int(answer[1:])
        if not answer:
            zygote.close()
            raise AnchorStartError("the anchor zygote exited")
        raise AnchorStartError(answer[1:].decode("utf-8", "replace"))

    async def _recv(self, sock: socket.socket) -> bytes:
        fut: asyncio.Future[None] = self.loop.create_future()
        fd = sock.fileno()

        def readable() -> None:
            if not fut.done():
                fut.set_result(None)

        self.loop.add_reader(fd, readable)
        try:
            await fut
        finally:
            self.loop.remove_reader(fd)
        return sock.recv(4096)

    async def _zygote(self, kind: str) -> _Zygote:
        zygote = self._zygotes.get(kind)
        if zygote is not None and zygote.alive:
            return zygote
        lock = self._starting.setdefault(kind, asyncio.Lock())
        async with lock:
            zygote = self._zygotes.get(kind)
            if zygote is not None and zygote.alive:
                return zygote
            if zygote is not None:
                zygote.close()
            zygote = await self._start_zygote(kind)
            self._zygotes[kind] = zygote
            return zygote

    async def _start_zygote(self, kind: str) -> _Zygote:
        bwrap = self._bwrap or shutil.which("bwrap")
        if bwrap is None:
            raise AnchorStartError(
                "bubblewrap (bwrap) is not installed: it is needed to start the server's "
                "anchor, the process the bus sees for this app instance"
            )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        with tempfile.TemporaryFile() as errlog:
            placeholder = os.open(os.devnull, os.O_RDONLY)
            try:
                proc = subprocess.Popen(
                    zygote_argv(bwrap, kind, theirs.fileno(), placeholder),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errlog,
                    pass_fds=(theirs.fileno(), placeholder),
                    start_new_session=True,
                )
            except OSError as exc:
                ours.close()
                raise AnchorStartError(
                    f"cannot run bubblewrap ({bwrap}): {exc.strerror}"
                ) from exc
            finally:
                theirs.close()
                os.close(placeholder)
            try:
                ready = await asyncio.wait_for(self._recv(ours), START_TIMEOUT)
            except (TimeoutError, OSError):
                ready = b""
            if ready != b"ready":
                proc.kill()
                await self.loop.run_in_executor(None, proc.wait)
                errlog.seek(0)
                text = errlog.read(2000).decode("utf-8", "replace").strip()
                ours.close()
                raise AnchorStartError(
                    f"bubblewrap could not start the anchor (exit status {proc.returncode})"
                    + (f": {text}" if text else "")
                )
        log.info(
            "anchor zygote for %s identity files started (pid %d), running %s",
            kind, proc.pid, describe(anchor_command()),
        )
        return _Zygote(proc, ours)

    def close(self) -> None:
        """Stop the zygotes (anchors already forked exit when their Connector closes)."""
        for zygote in self._zygotes.values():
            zygote.close()
        self._zygotes.clear()
