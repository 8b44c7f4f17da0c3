"""Proxy -> target score alignment adapters (the [align] issue fills this package)."""
