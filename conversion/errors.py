"""Conversion errors whose messages list the offending tensor names (first 20 and a count)."""

from __future__ import annotations

from collections.abc import Iterable

MAX_LISTED = 20


def list_names(names: Iterable[str], limit: int = MAX_LISTED) -> str:
    """``"a, b, c"`` for up to ``limit`` names, then ``"... (N in total)"``."""
    names = list(names)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names)} in total)"
    else:
        shown += f" ({len(names)} in total)"
    return shown


class ConversionError(Exception):
    """Any conversion failure that the CLI reports as one message and a non-zero exit status."""


class MissingTensorsError(ConversionError):
    def __init__(self, names: Iterable[str], where: str):
        self.names = sorted(names)
        super().__init__(f"{len(self.names)} tensors missing from {where}: {list_names(self.names)}")


class UnexpectedTensorsError(ConversionError):
    def __init__(self, names: Iterable[str], where: str):
        self.names = sorted(names)
        super().__init__(f"{len(self.names)} unexpected tensors in {where} (no mapping rule): {list_names(self.names)}")


class ShapeMismatchError(ConversionError):
    def __init__(self, problems: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], where: str):
        self.names = sorted(problems)
        detail = [f"{n} has shape {tuple(problems[n][0])}, expected {tuple(problems[n][1])}" for n in self.names]
        super().__init__(f"{len(self.names)} tensors with the wrong shape in {where}: {list_names(detail)}")


class TruncatedFileError(ConversionError):
    def __init__(self, path: str, names: Iterable[str], size: int, needed: int):
        self.names = sorted(names)
        super().__init__(
            f"truncated file {path}: {size} bytes on disk, header needs {needed}; "
            f"{len(self.names)} tensors lie past the end: {list_names(self.names)}"
        )


class UnknownSchemeError(ConversionError):
    def __init__(self, names: Iterable[str], where: str, known: Iterable[str]):
        self.names = sorted(names)
        super().__init__(
            f"unknown key scheme in {where}; known schemes: {', '.join(known)}; its keys are: {list_names(self.names)}"
        )
