"""Filtering policy: levels per bus name and Call/Broadcast rules (xdg-dbus-proxy semantics)."""

from .rules import (
    BROADCAST_ARGUMENT,
    CALL_ARGUMENT,
    POLICY_ARGUMENT,
    Level,
    Policy,
    PolicyError,
    Rule,
    max_level,
    parse_rule,
    policy_from_named_arguments,
)

__all__ = [
    "BROADCAST_ARGUMENT",
    "CALL_ARGUMENT",
    "POLICY_ARGUMENT",
    "Level",
    "Policy",
    "PolicyError",
    "Rule",
    "max_level",
    "parse_rule",
    "policy_from_named_arguments",
]
