"""Shared test support: system packages, processes and clients the suites reuse."""
