"""The service with one fault injected, for tests/integration/test_fault_isolation.py only.

``python -m tests.integration.fault_service -v serve ...`` runs ``xdg-containers`` after
patching one stage of a session (named by ``XDG_CONTAINERS_TEST_FAULT``) to raise
InjectedFault, but only for connections of servers whose instance id is ``faulty``:
everything else runs the real code. Nothing of this is in the installed service, so the
injection costs production nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from xdg_containers import cli
from xdg_containers.core.phase import Phase
from xdg_containers.proxy.endpoint import Endpoint
from xdg_containers.proxy.session import Session
from xdg_containers.servers.server import ContainerServer

FAULTY = "faulty"


class InjectedFault(RuntimeError):
    """Raised where the test asked for a fault."""


def _faulty(server: ContainerServer) -> bool:
    return server.spec.instance_id == FAULTY


class FaultyFilter:
    """Wraps a session's filter; raises in from_client or from_bus."""

    def __init__(self, inner: Any, stage: str) -> None:
        self._inner = inner
        self._stage = stage

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def from_client(self, hdr: Any, data: Any) -> Any:
        if self._stage == "from_client" and hdr.member == "GetId":
            raise InjectedFault("from_client")
        return self._inner.from_client(hdr, data)

    def from_bus(self, hdr: Any, data: Any) -> Any:
        if self._stage == "from_bus" and hdr.member == "NameAcquired":
            raise InjectedFault("from_bus")
        return self._inner.from_bus(hdr, data)


def install(stage: str) -> None:
    """Patch the code of ``stage``."""
    if stage == "client_sasl":
        client_data = Session._client_data

        def _client_data(self: Session, data: bytes, fds: list[int]) -> None:
            if _faulty(self.server) and self.phase is Phase.AUTH:
                raise InjectedFault("client_sasl")
            client_data(self, data, fds)

        Session._client_data = _client_data  # type: ignore[method-assign]
    elif stage == "bus_sasl":
        bus_data = Session._bus_data

        def _bus_data(self: Session, data: bytes, fds: list[int]) -> None:
            if _faulty(self.server) and not self._bus_began and not self._sasl_client.done:
                raise InjectedFault("bus_sasl")
            bus_data(self, data, fds)

        Session._bus_data = _bus_data  # type: ignore[method-assign]
    elif stage in ("from_client", "from_bus"):
        make_filter = ContainerServer.make_filter

        def _make_filter(self: ContainerServer, session: Session) -> Any:
            inner = make_filter(self, session)
            return FaultyFilter(inner, stage) if _faulty(self) else inner

        ContainerServer.make_filter = _make_filter  # type: ignore[method-assign]
    elif stage == "hello_reply":
        hello_answered = Session._hello_answered

        def _hello_answered(self: Session, hdr: Any, data: Any) -> None:
            if _faulty(self.server):
                raise InjectedFault("hello_reply")
            hello_answered(self, hdr, data)

        Session._hello_answered = _hello_answered  # type: ignore[method-assign]
    elif stage == "write":
        on_writable = Endpoint._on_writable
        paths: set[str] = set()
        started = Session.start

        def _start(self: Session) -> None:
            if _faulty(self.server):
                paths.add(self._client.sock.getsockname())
            started(self)

        def _on_writable(self: Endpoint) -> None:
            try:
                name = self.sock.getsockname()
            except OSError:
                name = ""
            if name in paths:
                # As a bug in the write path would: before the socket is written to.
                self._write_some = _broken_write  # type: ignore[method-assign]
            on_writable(self)

        def _broken_write() -> None:
            raise InjectedFault("write")

        Session.start = _start  # type: ignore[method-assign]
        Endpoint._on_writable = _on_writable  # type: ignore[method-assign]
    elif stage == "accept":
        accepted = ContainerServer._accepted

        def _accepted(self: ContainerServer, conn: Any) -> None:
            if _faulty(self):
                raise InjectedFault("accept")
            accepted(self, conn)

        ContainerServer._accepted = _accepted  # type: ignore[method-assign]
    elif stage == "session_start":
        start = Session.start

        def _session_start(self: Session) -> None:
            if _faulty(self.server):
                self._client.start_reading()
                self.server.handshake_started(self)
                raise InjectedFault("session_start")
            start(self)

        Session.start = _session_start  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown fault stage {stage!r}")


if __name__ == "__main__":
    install(os.environ["XDG_CONTAINERS_TEST_FAULT"])
    sys.exit(cli.main(sys.argv[1:]))
