"""Errors the `inmap` command maps to its exit codes, importable without torch."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that adds it (an
    input error for the command: exit 3)."""
