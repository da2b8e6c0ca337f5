"""Start a private dbus-daemon: for ``serve --private`` on a bare machine, and for tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from xml.sax.saxutils import escape

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <keep_umask/>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  {servicedirs}
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <allow user="*"/>
  </policy>
  <limit name="reply_timeout">60000</limit>
  {limits}
</busconfig>
"""


class PrivateBus:
    """A dbus-daemon of our own in a temp dir, stopped with ``stop()``."""

    def __init__(
        self,
        service_dirs: list[str] | None = None,
        env: dict[str, str] | None = None,
        limits: dict[str, int] | None = None,
    ):
        """``service_dirs``: directories of activatable .service files; ``limits``:
        extra ``<limit>`` settings (benchmarks raise max_replies_per_connection)."""
        self.tmpdir = tempfile.mkdtemp(prefix="xdg-containers-bus-")
        self.socket_path = os.path.join(self.tmpdir, "bus")
        dirs = "\n  ".join(
            f"<servicedir>{escape(d)}</servicedir>" for d in (service_dirs or [])
        )
        self.config_path = os.path.join(self.tmpdir, "bus.conf")
        with open(self.config_path, "w", encoding="utf-8") as fh:
            extra = "\n  ".join(
                f'<limit name="{escape(k)}">{int(v)}</limit>' for k, v in (limits or {}).items()
            )
            fh.write(
                _CONFIG.format(socket=escape(self.socket_path), servicedirs=dirs, limits=extra)
            )
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self._env = env

    def start(self) -> str:
        """Run the daemon and return its address."""
        dbus_daemon = shutil.which("dbus-daemon")
        if dbus_daemon is None:
            raise RuntimeError("dbus-daemon is not installed (apt-get install dbus)")
        env = dict(os.environ if self._env is None else self._env)
        self.process = subprocess.Popen(
            [dbus_daemon, "--config-file", self.config_path, "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()
        if not line:
            self.stop()
            raise RuntimeError("dbus-daemon did not start")
        self.address = line
        return line

    def stop(self) -> None:
        """Terminate the daemon (and anything it activated) and remove the temp dir."""
        p = self.process
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if p is not None and p.stdout is not None:
            p.stdout.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> PrivateBus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
