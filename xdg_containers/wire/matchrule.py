"""D-Bus match rules, parsed and matched exactly as dbus-daemon does it.

The proxy must see an AddMatch rule the way the bus will: a rule that the bus reads as
``eavesdrop=true`` must never slip through because we read it differently.
"""

# Behaviour matched (dbus-daemon bus/signals.c: bus_match_rule_parse, tokenize_rule,
# find_key, find_value, bus_match_rule_parse_arg_match, match_rule_matches):
#
# * The rule text may be at most 1024 bytes (DBUS_MAXIMUM_MATCH_RULE_LENGTH), counted
#   in UTF-8 bytes, checked before anything else.
# * Keys: leading " \t\n\r" is skipped (only those four: not \v or \f), the key runs until
#   '=' or one of those four, then " \t\n\r" is skipped again and '=' must follow
#   ("key with no subsequent '='"). Quotes are NOT special in keys: eaves''drop is the key
#   "eaves''drop", an unknown key, so the rule is invalid.
# * Values start right after '=' with no whitespace skipping: eavesdrop= 'true' has value
#   " true" and eavesdrop='true' ,x='y' has value "true " -- both invalid for eavesdrop.
#   Outside quotes: "'" opens a quoted run, ',' ends the value, "\'" is a literal "'",
#   a backslash before anything else is kept together with that character (so "\," does
#   NOT end the value), a backslash at the very end is kept. Inside quotes every character
#   is literal until the next "'". An unterminated quote is an error. So
#   eavesdrop=tr''ue, eavesdrop='tr''ue', eavesdrop='t'rue all read as "true".
# * At most 16 key=value tokens are read (MAX_RULE_TOKENS); anything after the 16th is
#   ignored without error. The tokenizer also stops silently where a key would be empty,
#   i.e. at the end of the text or at a '=' with no key before it: in
#   "type='signal',='x',eavesdrop='true'" dbus-daemon only sees type='signal'.
# * Duplicate type/sender/interface/member/destination, path together with
#   path_namespace, and the same argument slot twice (arg3 with arg3path, arg0 with
#   arg0namespace) are errors. eavesdrop may repeat; the last value wins; it must be
#   exactly "true" or "false".
# * argN: N is read with strtoul(..., base 0), so "arg010" is arg8, "arg0x3f" is arg63,
#   "arg+1" is arg1 and "arg-0" is arg0; N must be <= 63. The key may end in "path"
#   right after the number; only the exact key "arg0namespace" is a namespace key, and its
#   value must be a valid bus-name namespace.
# * sender/destination use libdbus's _dbus_validate_bus_name, which is laxer than the
#   specification for unique names (":1" and ":.a" pass); we accept what the bus accepts so
#   that we never read a rule as invalid that the bus would install.

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from xdg_containers.wire import names

__all__ = [
    "MAX_MATCH_RULE_ARG_NUMBER",
    "MAX_MATCH_RULE_LENGTH",
    "MatchRule",
    "MatchRuleError",
    "parse_match_rule",
    "rule_requests_eavesdrop",
    "signal_matches",
]

#: DBUS_MAXIMUM_MATCH_RULE_LENGTH, in bytes of UTF-8.
MAX_MATCH_RULE_LENGTH = 1024
#: DBUS_MAXIMUM_MATCH_RULE_ARG_NUMBER.
MAX_MATCH_RULE_ARG_NUMBER = 63
# MAX_RULE_TOKENS in bus/signals.c.
_MAX_RULE_TOKENS = 16

_KEY_WHITESPACE = frozenset(" \t\n\r")  # ISWHITE() in signals.c
_C_ISSPACE = frozenset(" \t\n\v\f\r")  # what strtoul() skips in the C locale
_MESSAGE_TYPES = frozenset({"method_call", "method_return", "signal", "error"})
_BUS_NAME_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-")
_BUS_NAME_CHARS = _BUS_NAME_FIRST | frozenset("0123456789")
_ULONG_MAX = 2**64 - 1


class MatchRuleError(ValueError):
    """A match rule that dbus-daemon would refuse; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class MatchRule:
    """One parsed match rule; ``None`` fields are absent from the rule and match anything."""

    message_type: str | None = None
    sender: str | None = None
    interface: str | None = None
    member: str | None = None
    path: str | None = None
    path_namespace: str | None = None
    destination: str | None = None
    eavesdrop: bool = False
    args: tuple[tuple[int, str], ...] = ()
    arg_paths: tuple[tuple[int, str], ...] = ()
    arg0namespace: str | None = None

    def to_text(self) -> str:
        """Render the rule in dbus-daemon's canonical quoting; parsing it gives this rule back."""
        parts: list[str] = []
        fields = (("type", self.message_type), ("sender", self.sender),
                  ("interface", self.interface), ("member", self.member), ("path", self.path),
                  ("path_namespace", self.path_namespace), ("destination", self.destination))
        for key, value in fields:
            if value is not None:
                parts.append(f"{key}={_quote(value)}")
        if self.eavesdrop:
            parts.append("eavesdrop='true'")
        slots: list[tuple[int, str, str]] = [(n, f"arg{n}", v) for n, v in self.args]
        slots += [(n, f"arg{n}path", v) for n, v in self.arg_paths]
        if self.arg0namespace is not None:
            slots.append((0, "arg0namespace", self.arg0namespace))
        for _, key, value in sorted(slots):
            parts.append(f"{key}={_quote(value)}")
        return ",".join(parts)


def _quote(value: str) -> str:
    # Close the quote, emit \' and reopen: the only way to write ' in a quoted value.
    return "'" + value.replace("'", "'\\''") + "'"


def _check_length(text: str) -> None:
    if "\0" in text:
        # A D-Bus string cannot carry NUL; the bus refuses such a message outright.
        raise MatchRuleError("Match rule contains a NUL character")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise MatchRuleError("Match rule is not valid UTF-8") from None
    if size > MAX_MATCH_RULE_LENGTH:
        raise MatchRuleError(f"Match rule text is {size} bytes, maximum is {MAX_MATCH_RULE_LENGTH}")


def _tokenize(text: str) -> list[tuple[str, str]]:
    """Split `text` into (key, value) pairs with tokenize_rule()'s exact rules."""
    tokens: list[tuple[str, str]] = []
    n = len(text)
    pos = 0
    while len(tokens) < _MAX_RULE_TOKENS and pos < n:
        # find_key()
        p = pos
        while p < n and text[p] in _KEY_WHITESPACE:
            p += 1
        key_start = p
        while p < n and text[p] != "=" and text[p] not in _KEY_WHITESPACE:
            p += 1
        key_end = p
        while p < n and text[p] in _KEY_WHITESPACE:
            p += 1
        if key_start == key_end:
            # End of text, or '=' with no key: dbus-daemon leaves an empty token slot here
            # and every later iteration stops at the same place, so parsing ends.
            break
        if p >= n or text[p] != "=":
            raise MatchRuleError("Match rule has a key with no subsequent '=' character")
        p += 1
        key = text[key_start:key_end]

        # find_value()
        value: list[str] = []
        state = ""  # "" plain, "'" inside quotes, "\\" after a backslash outside quotes
        while p < n:
            c = text[p]
            p += 1
            if state == "":
                if c == "'":
                    state = "'"
                elif c == ",":
                    break
                elif c == "\\":
                    state = "\\"
                else:
                    value.append(c)
            elif state == "\\":
                # A backslash only escapes an apostrophe; otherwise both are kept.
                if c != "'":
                    value.append("\\")
                value.append(c)
                state = ""
            elif c == "'":
                state = ""
            else:
                value.append(c)
        if state == "\\":
            value.append("\\")
        elif state == "'":
            raise MatchRuleError("Unbalanced quotation marks in match rule")
        tokens.append((key, "".join(value)))
        pos = p
    return tokens


def _libdbus_bus_name_ok(name: str, *, namespace: bool) -> bool:
    """_dbus_validate_bus_name / _dbus_validate_bus_namespace, laxness included."""
    if not 0 < len(name.encode("utf-8", "surrogatepass")) <= names.MAX_NAME_LENGTH:
        return False
    if name[0] == ":":
        # libdbus only checks characters and dots for unique names: ":" and ":.a" pass.
        i, n = 1, len(name)
        while i < n:
            c = name[i]
            if c == ".":
                if i + 1 == n or name[i + 1] not in _BUS_NAME_CHARS:
                    return False
                i += 2
            elif c in _BUS_NAME_CHARS:
                i += 1
            else:
                return False
        return True
    elements = name.split(".")
    if not namespace and len(elements) < 2:
        return False
    return all(
        e and e[0] in _BUS_NAME_FIRST and all(c in _BUS_NAME_CHARS for c in e) for e in elements
    )


def _strtoul(text: str, start: int) -> tuple[int, int] | None:
    """C strtoul(text + start, &end, 0): (value, end index), or None where libdbus fails."""
    n = len(text)
    i = start
    while i < n and text[i] in _C_ISSPACE:
        i += 1
    negative = False
    if i < n and text[i] in "+-":
        negative = text[i] == "-"
        i += 1
    if (
        i + 2 < n
        and text[i] == "0"
        and text[i + 1] in "xX"
        and text[i + 2] in "0123456789abcdefABCDEF"
    ):
        base, digits = 16, "0123456789abcdefABCDEF"
        i += 2
    elif i < n and text[i] == "0":
        base, digits = 8, "01234567"
    else:
        base, digits = 10, "0123456789"
    j = i
    while j < n and text[j] in digits:
        j += 1
    if j == i:
        return None  # no conversion: endptr == start
    value = int(text[i:j], base)
    if value > _ULONG_MAX:
        return None  # ERANGE
    if negative:
        value = (-value) % (_ULONG_MAX + 1)
    return value, j


def parse_match_rule(text: str) -> MatchRule:
    """Parse `text` as dbus-daemon's AddMatch would; raise MatchRuleError where it would fail."""
    _check_length(text)
    tokens = _tokenize(text)

    fields: dict[str, str] = {}
    eavesdrop = False
    path_key: str | None = None
    slots: dict[int, tuple[str, str]] = {}  # arg number -> (kind, value)

    for key, value in tokens:
        if key in ("type", "sender", "interface", "member", "destination"):
            if key in fields:
                raise MatchRuleError(f"Key {key} specified twice in match rule")
            if key == "type" and value not in _MESSAGE_TYPES:
                raise MatchRuleError(f"Invalid message type ({value}) in match rule")
            if key in ("sender", "destination") and not _libdbus_bus_name_ok(
                value, namespace=False
            ):
                raise MatchRuleError(f"{key.capitalize()} name '{value}' is invalid")
            if key == "interface" and not names.is_valid_interface_name(value):
                raise MatchRuleError(f"Interface name '{value}' is invalid")
            if key == "member" and not names.is_valid_member_name(value):
                raise MatchRuleError(f"Member name '{value}' is invalid")
            fields[key] = value
        elif key in ("path", "path_namespace"):
            if path_key is not None:
                raise MatchRuleError("path or path_namespace specified twice in match rule")
            if not names.is_valid_object_path(value):
                raise MatchRuleError(f"Path '{value}' is invalid")
            path_key = key
            fields[key] = value
        elif key == "eavesdrop":
            if value == "true":
                eavesdrop = True
            elif value == "false":
                eavesdrop = False
            else:
                raise MatchRuleError(
                    f"eavesdrop='{value}' is invalid, it should be 'true' or 'false'"
                )
        elif key.startswith("arg"):
            number, kind = _parse_arg_key(key, value)
            if number in slots:
                raise MatchRuleError(f"Argument {key} matched more than once in match rule")
            slots[number] = (kind, value)
        else:
            raise MatchRuleError(f'Unknown key "{key}" in match rule')

    return MatchRule(
        message_type=fields.get("type"),
        sender=fields.get("sender"),
        interface=fields.get("interface"),
        member=fields.get("member"),
        path=fields.get("path"),
        path_namespace=fields.get("path_namespace"),
        destination=fields.get("destination"),
        eavesdrop=eavesdrop,
        args=tuple(sorted((n, v) for n, (k, v) in slots.items() if k == "")),
        arg_paths=tuple(sorted((n, v) for n, (k, v) in slots.items() if k == "path")),
        arg0namespace=next((v for k, v in slots.values() if k == "namespace"), None),
    )


def _parse_arg_key(key: str, value: str) -> tuple[int, str]:
    """bus_match_rule_parse_arg_match(): the arg number and kind ('', 'path', 'namespace')."""
    if len(key.encode("utf-8", "surrogatepass")) < 4:
        raise MatchRuleError(f"Key '{key}' in match rule starts with 'arg' but lacks an arg number")
    parsed = _strtoul(key, 3)
    if parsed is None:
        raise MatchRuleError(
            f"Key '{key}' in match rule starts with 'arg' but could not parse arg number"
        )
    number, end = parsed
    kind = ""
    if end != len(key):
        if end + 4 == len(key) and key.endswith("path"):
            kind = "path"
        elif key == "arg0namespace":
            kind = "namespace"
            if not _libdbus_bus_name_ok(value, namespace=True):
                raise MatchRuleError(f"arg0namespace='{value}' is not a valid prefix of a bus name")
        else:
            raise MatchRuleError(
                f"Key '{key}' in match rule contains junk after argument number ({number})"
            )
    if number > MAX_MATCH_RULE_ARG_NUMBER:
        raise MatchRuleError(
            f"Key '{key}' in match rule has arg number {number} but the maximum is "
            f"{MAX_MATCH_RULE_ARG_NUMBER}"
        )
    return number, kind


def rule_requests_eavesdrop(text: str) -> bool:
    """True if the bus would install `text` as an eavesdropping match rule.

    A rule the bus accepts is judged by its parsed ``eavesdrop`` flag (every spelling the bus
    understands). A rule that does not parse would be refused by the bus itself, so it
    normally gives False; as a second line of defence, if its key=value tokens still contain
    ``eavesdrop`` with the value ``true`` we answer True anyway (the client then gets
    AccessDenied instead of the bus's MatchRuleInvalid for a rule that fails either way).
    """
    try:
        return parse_match_rule(text).eavesdrop
    except MatchRuleError:
        pass
    try:
        tokens = _tokenize(text)
    except MatchRuleError:
        return False
    return any(key == "eavesdrop" and value == "true" for key, value in tokens)


def _arg_path_matches(expected: bytes, actual: bytes) -> bool:
    # Either string is a '/'-terminated prefix of the other, or they are equal. An empty
    # string has no last byte; dbus-daemon reads the byte before it (never '/'), so: no.
    if len(actual) < len(expected) and not actual.endswith(b"/"):
        return False
    if len(expected) < len(actual) and not expected.endswith(b"/"):
        return False
    shortest = min(len(actual), len(expected))
    return actual[:shortest] == expected[:shortest]


def _arg_namespace_matches(expected: bytes, actual: bytes) -> bool:
    if len(expected) > len(actual) or actual[: len(expected)] != expected:
        return False
    return len(expected) == len(actual) or actual[len(expected)] == ord(".")


def signal_matches(
    rule: MatchRule,
    *,
    sender: str | None,
    path: str | None,
    interface: str | None,
    member: str | None,
    destination: str | None,
    string_args: Sequence[str | None],
    sender_names: Collection[str] = (),
    destination_names: Collection[str] = (),
    object_path_args: Sequence[str | None] = (),
) -> bool:
    """True if dbus-daemon would deliver this signal to the owner of `rule` because of it.

    `sender` is the sender header (``org.freedesktop.DBus`` for the bus driver's signals);
    `sender_names` are the names the sender is primary owner of (its unique name included),
    so a rule's well-known ``sender`` matches. `string_args[i]` is argument i when its type
    is ``s`` (None otherwise or when absent); `object_path_args[i]` is argument i when its
    type is ``o``, which only ``argNpath`` keys may match. For a unicast signal,
    `destination_names` are the names its addressed recipient owns.
    """
    if rule.message_type is not None and rule.message_type != "signal":
        return False
    if rule.interface is not None and interface != rule.interface:
        return False
    if rule.member is not None and member != rule.member:
        return False
    if rule.sender is not None and rule.sender != sender and rule.sender not in sender_names:
        return False
    if rule.destination is not None:
        # Only an eavesdropper's rule with a destination matches someone else's unicast.
        if destination is None or not rule.eavesdrop:
            return False
        if rule.destination != destination and rule.destination not in destination_names:
            return False
    elif destination is not None and not rule.eavesdrop:
        return False
    if rule.path is not None and path != rule.path:
        return False
    if rule.path_namespace is not None:
        ns = rule.path_namespace
        if path is None or not path.startswith(ns):
            return False
        # "/" is the only valid path of length 1 and matches everything.
        if len(ns) > 1 and len(path) > len(ns) and path[len(ns)] != "/":
            return False

    def arg(seq: Sequence[str | None], i: int) -> str | None:
        return seq[i] if i < len(seq) else None

    for i, expected in rule.args:
        actual = arg(string_args, i)
        if actual is None or actual != expected:
            return False
    for i, expected in rule.arg_paths:
        actual = arg(string_args, i)
        if actual is None:
            actual = arg(object_path_args, i)
        if actual is None or not _arg_path_matches(
            expected.encode("utf-8", "surrogatepass"), actual.encode("utf-8", "surrogatepass")
        ):
            return False
    if rule.arg0namespace is not None:
        actual = arg(string_args, 0)
        if actual is None or not _arg_namespace_matches(
            rule.arg0namespace.encode("utf-8", "surrogatepass"),
            actual.encode("utf-8", "surrogatepass"),
        ):
            return False
    return True
