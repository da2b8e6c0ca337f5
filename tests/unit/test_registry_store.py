"""The persisted registry (SPEC 13): value codec, record validation, private atomic store."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant

from xdg_containers.servers.record import RecordError, ServerRecord, record_from_json
from xdg_containers.servers.store import MAX_RECORD_BYTES, RegistryStore
from xdg_containers.servers.valuejson import SignatureError, decode, encode

VALUES: list[tuple[str, Any]] = [
    ("y", 255), ("b", True), ("n", -32768), ("q", 65535), ("i", -1), ("u", 2**32 - 1),
    ("x", -(2**63)), ("t", 2**64 - 1), ("d", 0.1), ("d", float("inf")), ("s", "héllo"),
    ("o", "/org/x"), ("g", "a{sv}(ii)"), ("ay", b"\0\1\xff"), ("as", ["a", ""]),
    ("a{sv}", {"k": Variant("as", ["x"]), "n": Variant("v", Variant("i", 3))}),
    ("(sa{ui})", ["s", {1: 2}]), ("aai", [[1], [], [2, 3]]),
]


@pytest.mark.parametrize(("sig", "value"), VALUES)
def test_values_round_trip_through_json(sig: str, value: Any) -> None:
    data = json.loads(json.dumps(encode(sig, value)))
    assert decode(sig, data) == value


BAD: list[tuple[str, Any, str]] = [
    ("y", 256, "not a valid 'y'"), ("i", True, "not a valid 'i'"), ("b", 1, "'b'"),
    ("s", "a\0b", "NUL"), ("o", "not/a/path", "object path"), ("g", "a{", "signature"),
    ("v", ["ii", [1, 2]], "single complete type"), ("v", ["s"], "[signature, value]"),
    ("ay", "!!", "base64"), ("(ii)", [1], "needs 2 fields"),
    ("a{si}", [["a", 1], ["a", 2]], "twice"),
    ("h", 3, "file descriptor"), ("d", "x", "'d'"), ("as", "abc", "where 'as' was expected"),
]


@pytest.mark.parametrize(("sig", "data", "says"), BAD)
def test_values_that_do_not_fit_are_refused_naming_why(sig: str, data: Any, says: str) -> None:
    with pytest.raises(SignatureError, match=says):
        decode(sig, data)


def test_deep_nesting_is_refused() -> None:
    data: Any = ["i", 1]
    for _ in range(70):
        data = ["v", data]
    with pytest.raises(SignatureError, match="too deeply"):
        decode("v", data)


def test_fds_are_never_stored() -> None:
    with pytest.raises(SignatureError, match="file descriptor"):
        encode("a{sv}", {"fd": Variant("h", 3)})


def record(n: int = 3, **changes: Any) -> ServerRecord:
    base = ServerRecord(
        path=f"/org/freedesktop/DBus/Containers1/c{n}", container_type="org.flatpak",
        app_id="org.example.App", instance_id="42",
        metadata={"Origin": Variant("s", "x"), "Nested": Variant("a{sv}", {"a": Variant("u", 1)})},
        creator={"UnixUserID": Variant("u", 1000)}, creator_uid=1000, creator_name=":1.7",
        bus_address="unix:path=/run/user/1000/bus", guid="0" * 32,
        socket_path="/run/user/1000/dbus-1/containers/abc", stop_on_disconnect=False,
        policy_arguments={
            "org.freedesktop.XdgContainers1.Filter": Variant("b", True),
            "org.freedesktop.XdgContainers1.Policy": Variant("a{ss}", {"org.a.B": "talk"}),
        },
    )
    return replace(base, **changes)


def test_a_record_round_trips() -> None:
    r = record()
    assert record_from_json(json.loads(json.dumps(r.to_json()))) == r
    assert r.number == 3
    r = record(connector=True, stop_on_notify=True, socket_id=(2049, 77))
    assert record_from_json(json.loads(json.dumps(r.to_json()))) == r


def test_fields_added_later_in_version_1_may_be_absent() -> None:
    data = record().to_json()
    for later in ("connector", "stop_on_notify", "socket_id"):
        del data[later]
    r = record_from_json(data)
    assert (r.connector, r.stop_on_notify, r.socket_id) == (False, False, None)


def test_rebind_takes_only_sockets_this_service_mints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record's socket path is untrusted: nothing outside our socket directory, nothing
    not named as we name sockets, no live socket, no file that is not a socket."""
    import socket

    from xdg_containers.servers.spec import runtime_socket_dir
    from xdg_containers.service.restore import RestoreError, rebind

    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    directory = runtime_socket_dir()
    for bad in ("/tmp/dbus-0123456789abcdef", f"{directory}/other",
                f"{directory}/../dbus-0123456789abcdef"):
        with pytest.raises(RestoreError, match="not a socket this service mints"):
            rebind(bad)
    path = f"{directory}/dbus-0123456789abcdef"
    live = rebind(path)  # a fresh path
    with pytest.raises(RestoreError, match="already listens"):
        rebind(path)
    live.close()  # leaves a stale socket file: replaced
    again = rebind(path)
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    client.close()
    again.close()
    os.unlink(path)
    with open(path, "w"):
        pass
    with pytest.raises(RestoreError, match="not a socket"):
        rebind(path)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("version", 2, "version"), ("path", "/org/freedesktop/DBus/Containers1/c01", "server path"),
    ("path", "/elsewhere/c1", "server path"), ("creator_name", "org.x", "unique name"),
    ("bus_address", "nonsense", "bus_address"), ("guid", "G" * 32, "guid"),
    ("socket_path", "relative", "absolute"), ("creator_uid", -1, "uid"),
    ("stop_on_disconnect", "yes", "true or false"), ("app_id", 5, "string"),
    ("metadata", {"a": 1}, "metadata"), ("extra", 1, "unknown field"),
    ("policy_arguments", [["org.freedesktop.XdgContainers1.Policy", ["a{ss}", []]]],
     "without org.freedesktop.XdgContainers1.Filter"),
    ("policy_arguments", [["StopOnDisconnect", ["b", True]]],
     "unsupported named argument 'StopOnDisconnect'"),
    ("connector", 1, "true or false"), ("stop_on_notify", None, "true or false"),
    ("socket_id", [1], r"\[device, inode\]"), ("socket_id", [1, -2], "inode"),
    ("socket_id", "1:2", "inode"),
])
def test_records_that_do_not_fit_are_refused_naming_the_field(
    field: str, value: Any, says: str
) -> None:
    data = record().to_json()
    data[field] = value
    with pytest.raises(RecordError, match=says):
        record_from_json(data)


def test_store_writes_private_files_atomically_and_loads_them(tmp_path: Path) -> None:
    store = RegistryStore(str(tmp_path / "reg"))
    store.save(record(3))
    store.save(record(10))
    store.save(record(3, app_id="org.example.Changed"))
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    for name in os.listdir(store.directory):
        assert stat.S_IMODE(os.stat(os.path.join(store.directory, name)).st_mode) == 0o600
    records, problems = store.load()
    assert problems == []
    assert [(r.number, r.app_id) for r in records] == [
        (3, "org.example.Changed"), (10, "org.example.App")
    ]
    store.remove(record(3).path)
    store.remove(record(3).path)
    assert [r.number for r in store.load()[0]] == [10]


def test_store_skips_what_it_cannot_trust_and_says_why(tmp_path: Path) -> None:
    store = RegistryStore(str(tmp_path / "reg"))
    store.save(record(1))
    d = Path(store.directory)
    (d / "c2.json").write_text("{")
    os.chmod(d / "c2.json", 0o600)
    (d / "c3.json").write_text(json.dumps(record(3).to_json()))
    os.chmod(d / "c3.json", 0o644)
    (d / "c4.json").write_text(json.dumps(record(5).to_json()))
    os.chmod(d / "c4.json", 0o600)
    (d / "c6.json").symlink_to(d / "c1.json")
    (d / "c7.json").write_bytes(b" " * (MAX_RECORD_BYTES + 1))
    os.chmod(d / "c7.json", 0o600)
    (d / "notes.txt").write_text("x")
    (d / "c8.json.tmp-abcd").write_text("half")
    records, problems = store.load()
    assert [r.number for r in records] == [1]
    text = "\n".join(problems)
    for says in ("c2.json: not JSON", "c3.json: mode 644", "c4.json: holds the record of",
                 "c6.json:", "c7.json: 262145 bytes", "notes.txt: not a record file name"):
        assert says in text, text
    assert not (d / "c8.json.tmp-abcd").exists()


def test_a_missing_directory_is_an_empty_registry(tmp_path: Path) -> None:
    assert RegistryStore(str(tmp_path / "none")).load() == ([], [])


def test_the_service_keeps_no_fd_and_skips_a_server_it_cannot_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    from xdg_containers.servers.spec import ServerSpec
    from xdg_containers.service.persistence import Persistence

    spec = ServerSpec(
        container_type="org.flatpak", app_id="org.example.App", instance_id="1",
        metadata={"Handle": Variant("h", 3)},
        creator={"UnixUserID": Variant("u", 0), "ProcessFD": Variant("h", 5)},
        creator_uid=0, creator_name=":1.1", bus_address="unix:path=/b", stop_on_disconnect=True,
    )
    server: Any = SimpleNamespace(
        path="/org/freedesktop/DBus/Containers1/c4", listening=True, guid="f" * 32,
        socket_path="/run/s", spec=spec, socket_id=(1, 2),
    )
    keep = Persistence(RegistryStore(str(tmp_path / "reg")))
    keep.save(server)
    assert "not kept for a restart: a file descriptor cannot be stored" in caplog.text
    assert keep.store is not None and keep.store.load() == ([], [])
    spec.metadata = {}
    keep.save(server)
    (rec,) = keep.store.load()[0]
    assert rec.creator == {"UnixUserID": Variant("u", 0)}
    server.listening = False
    keep.forget(server)
    assert keep.store.load() == ([], [])
