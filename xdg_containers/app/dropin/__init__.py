"""``xdg-containers-dbus-proxy``: a drop-in for xdg-dbus-proxy (SPEC section 11)."""
