"""cli: see docs/design.md, Layout."""
