"""``xdg-containers``: serve, run, and the admin views (list, info, identify, stop)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from dbus_fast import BusType

from xdg_containers.config import ConfigError, load_config
from xdg_containers.wire.address import session_bus_address

log = logging.getLogger("xdg_containers")

#: The status a shell shows for a command killed by SIGPIPE (128 + 13).
EXIT_READER_GONE = 128 + signal.SIGPIPE


def _parse_limit(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    """The command-line grammar (SPEC §8)."""
    parser = argparse.ArgumentParser(
        prog="xdg-containers",
        description="org.freedesktop.DBus.Containers1 service: per-app-instance D-Bus sockets.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the service")
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--session", action="store_true", help="use the session bus (default)")
    where.add_argument("--system", action="store_true", help="use the system bus")
    where.add_argument("--address", metavar="ADDR", help="use the bus at this D-Bus address")
    where.add_argument(
        "--private", action="store_true", help="start a private dbus-daemon and serve on it"
    )
    serve.add_argument("--config", metavar="FILE", help="limits config file (INI, [limits])")
    serve.add_argument(
        "--limit",
        metavar="NAME=VALUE",
        action="append",
        type=_parse_limit,
        default=[],
        help="override one limit, e.g. --limit max_servers=16 (repeatable)",
    )
    serve.add_argument(
        "--ready-fd", type=int, metavar="N", help="write READY=1 to fd N once serving"
    )
    serve.add_argument(
        "--replace", action="store_true",
        help="take over from the running service: its name, servers and sockets; it keeps "
        "forwarding its live connections until they close, then exits (upgrades, reload)",
    )
    serve.add_argument(
        "--detach", action="store_true",
        help="return once the service is ready (exit 0), leaving it running in the "
        "background (the unit's ExecReload: serve --replace --detach)",
    )

    from xdg_containers.app.launcher import add_run_parser
    from xdg_containers.cli.admin import add_admin_parsers

    add_run_parser(sub)
    add_admin_parsers(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s xdg-containers[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the service until signalled; start a private bus when asked or when none exists."""
    from xdg_containers.cli.privatebus import PrivateBus
    from xdg_containers.io.dispatch import new_event_loop
    from xdg_containers.service.daemon import HANDED_OVER, ServiceError, serve
    from xdg_containers.service.memtune import tune_malloc

    try:
        limits = load_config(args.config, dict(args.limit))
    except ConfigError as exc:
        print(f"xdg-containers: {exc}", file=sys.stderr)
        return 2
    if args.detach:
        if args.ready_fd is not None or args.private:
            print("xdg-containers: --detach cannot go with --ready-fd or --private",
                  file=sys.stderr)
            return 2
        from xdg_containers.cli import detach

        status, args.ready_fd = detach.detach()
        if status is not None:
            return status
    private: PrivateBus | None = None
    bus_type = BusType.SESSION
    address: str | None = None
    if args.system:
        bus_type = BusType.SYSTEM
    elif args.address:
        address = args.address
    elif args.private or (not args.session and session_bus_address() is None):
        if not os.environ.get("XDG_RUNTIME_DIR"):
            print(
                "xdg-containers: XDG_RUNTIME_DIR is not set, and the private bus and the "
                "servers' sockets go there; set it to a directory of yours with mode 0700",
                file=sys.stderr,
            )
            return 2
        private = PrivateBus()
        try:
            address = private.start()
        except RuntimeError as exc:
            print(f"xdg-containers: cannot start a private bus: {exc}", file=sys.stderr)
            return 1
        try:
            print(f"DBUS_SESSION_BUS_ADDRESS={address}", flush=True)
        except BaseException:
            private.stop()  # nobody can learn its address: do not leave it running
            raise
        print(
            f"xdg-containers: no session bus here; started a private one at {address} "
            "(point clients at it with DBUS_SESSION_BUS_ADDRESS, printed on stdout)",
            file=sys.stderr,
        )
        os.environ["DBUS_SESSION_BUS_ADDRESS"] = address
    elif args.session:
        address = session_bus_address()
        if address is None:
            print(
                "xdg-containers: no session bus: DBUS_SESSION_BUS_ADDRESS is unset and "
                "$XDG_RUNTIME_DIR/bus does not exist; use --address ADDR for another bus, "
                "or --private to start one",
                file=sys.stderr,
            )
            return 2
    tune_malloc()
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            status = runner.run(serve(address, bus_type, limits, args.ready_fd,
                                      replace=args.replace))
        if status == HANDED_OVER:
            if private is not None:
                # The service that took over serves on the bus this process started:
                # it must outlive our service, until we are told to stop.
                print("xdg-containers: handed over to a new service; keeping the private "
                      f"bus at {address} until SIGTERM", file=sys.stderr)
                wait_for_stop_signal()
            return 0
        return status
    except ServiceError as exc:
        print(f"xdg-containers: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0
    finally:
        if private is not None:
            private.stop()


def wait_for_stop_signal() -> None:
    """Block until SIGTERM or SIGINT."""
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    signal.sigwait(signals)


def reader_gone() -> int:
    """End quietly because whoever read our output left (``| head``), as coreutils do.

    ``seq 1000000 | head -c1`` dies of SIGPIPE (the shell shows 141), with no
    message; so do we, instead of Python's BrokenPipeError traceback."""
    # Nothing may be flushed to the broken pipe on the way out (a second EPIPE).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    return EXIT_READER_GONE  # not reached unless SIGPIPE is blocked


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xdg-containers`` command."""
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            sys.stdout.flush()  # --help's text: a reader that left is noticed here too
            raise
        _setup_logging(args.verbose)
        if args.command == "serve":
            result: int = cmd_serve(args)
        else:
            handler = args.handler
            result = handler(args)
        sys.stdout.flush()  # here, where EPIPE is caught, not at interpreter exit
    except BrokenPipeError:
        return reader_gone()
    return result


if __name__ == "__main__":
    sys.exit(main())
