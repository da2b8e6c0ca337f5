"""Every dependency API that differs between supported releases, or is private, in one place.

``dbusfast``: dbus-fast 1.84.2 (Debian 12) to 5.x; ``aio``: asyncio's loop internals that
the dispatching selector peeks at. Each entry says which releases differ and what it falls
back to; tests/unit/test_compat_*.py are canaries that name the API when a release changes it.
"""
