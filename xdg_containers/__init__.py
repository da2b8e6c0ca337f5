"""xdg-containers: org.freedesktop.DBus.Containers1 as a standalone D-Bus service."""

__version__ = "0.1.0"
