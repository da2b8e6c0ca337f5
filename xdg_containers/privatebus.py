"""Start a private dbus-daemon for ``serve --private`` (or ``serve`` with no session bus)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from xml.sax.saxutils import escape

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <keep_umask/>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <allow user="*"/>
  </policy>
  <limit name="reply_timeout">60000</limit>
  {extra}
</busconfig>
"""


class PrivateBus:
    """A dbus-daemon of our own in a temp dir, stopped with ``stop()``."""

    def __init__(self) -> None:
        """Make the temp dir; nothing runs until ``start()``."""
        self.tmpdir = tempfile.mkdtemp(prefix="xdg-containers-bus-")
        self.socket_path = os.path.join(self.tmpdir, "bus")
        self.config_path = os.path.join(self.tmpdir, "bus.conf")
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.env: dict[str, str] | None = None

    def config(self) -> str:
        """The daemon's configuration (a subclass may add elements to it)."""
        return CONFIG.format(socket=escape(self.socket_path), extra="")

    def start(self) -> str:
        """Run the daemon and return its address."""
        dbus_daemon = shutil.which("dbus-daemon")
        if dbus_daemon is None:
            raise RuntimeError("dbus-daemon is not installed (apt-get install dbus)")
        with open(self.config_path, "w", encoding="utf-8") as fh:
            fh.write(self.config())
        self.process = subprocess.Popen(
            [dbus_daemon, "--config-file", self.config_path, "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ if self.env is None else self.env),
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
