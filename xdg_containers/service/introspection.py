"""What Introspect and GetManagedObjects answer for our objects, produced explicitly.

The interface XML comes from the members declared with compat.dbusfast's decorators
(signatures and annotations such as EmitsChangedSignal, which dbus-fast before 5.0 cannot
express), not from dbus-fast's own introspection; data/dbus-1/interfaces holds the same
description and tests/integration/test_introspection_xml.py compares the two.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from dbus_fast import Message, Variant
from dbus_fast.introspection import Node
from dbus_fast.service import ServiceInterface

from ..compat.dbusfast import Member, complete_types, members

_DOCTYPE = (
    '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
    '"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
)


def _annotate(parent: ET.Element, notes: tuple[tuple[str, str], ...]) -> None:
    for name, value in notes:
        ET.SubElement(parent, "annotation", {"name": name, "value": value})


def interface_element(name: str, cls: type) -> ET.Element:
    """The <interface> element of interface ``name`` implemented by ``cls``."""
    iface = ET.Element("interface", {"name": name})
    for m in members(cls):
        if m.kind == "property":
            el = ET.SubElement(
                iface, "property", {"name": m.name, "type": m.out_signature, "access": "read"}
            )
            _annotate(el, m.annotations)
            continue
        el = ET.SubElement(iface, m.kind, {"name": m.name})
        for arg_name, arg_type in m.in_args:
            ET.SubElement(el, "arg", {"name": arg_name, "type": arg_type, "direction": "in"})
        out_dir = {"direction": "out"} if m.kind == "method" else {}
        for arg_type in complete_types(m.out_signature):
            ET.SubElement(el, "arg", {"type": arg_type, **out_dir})
        _annotate(el, m.annotations)
    return iface


def node_xml(path: str, objects: list[ServiceInterface], children: list[str]) -> str:
    """Introspect's answer at ``path``: the standard interfaces dbus-fast serves, the
    interfaces of ``objects`` and the child nodes ``children`` (names, not paths)."""
    root = Node.default(path).to_xml()
    for obj in objects:
        root.append(interface_element(obj.name, type(obj)))
    for child in sorted(children):
        ET.SubElement(root, "node", {"name": child})
    return _DOCTYPE + ET.tostring(root, encoding="unicode")


def method_table(objects: list[tuple[str, type]]) -> dict[tuple[str, str], Member]:
    """(interface, method name) to the declared method, for each (interface, class)."""
    return {
        (iface, m.name): m for iface, cls in objects for m in members(cls) if m.kind == "method"
    }


def property_values(obj: ServiceInterface) -> dict[str, Variant]:
    """Every property of ``obj`` with its current value."""
    return {
        m.name: Variant(m.out_signature, m.fn(obj))
        for m in members(type(obj))
        if m.kind == "property"
    }


def managed_objects_reply(msg: Message, objects: list[tuple[str, ServiceInterface]]) -> Message:
    """GetManagedObjects answered from ``objects`` alone (those below the called path).

    What a confined caller gets: the manager and its own server, never another
    instance (SPEC 12).
    """
    base = msg.path or "/"
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for path, obj in objects:
        if base == "/" or path.startswith(base + "/"):
            result[path] = {obj.name: property_values(obj)}
    return Message.new_method_return(msg, "a{oa{sa{sv}}}", [result])
