"""app: see docs/design.md, Layout."""
