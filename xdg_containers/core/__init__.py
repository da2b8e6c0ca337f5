"""The session core, sans I/O: one proxied connection's states and every decision on it.

Nothing here reads or writes a socket, waits or schedules: the asyncio driver
(``proxy/session.py``) feeds it what it read and carries out what it asks for
through the ``Port`` and ``SessionHost`` interfaces (``ports.py``). Imports no
asyncio, socket or selectors (tests/unit/test_core_imports.py checks).
"""
