"""Human-readable units for reports and messages."""

from __future__ import annotations

__all__ = ["format_bytes"]

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float, digits: int = 2) -> str:
    """Bytes in binary units: ``format_bytes(1536) == "1.50 KiB"``, ``format_bytes(12) == "12 B"``.

    Args:
      n: a number of bytes.
      digits: decimals shown for KiB and above (whole bytes are shown without any); one-line
        error messages use 1 (``"8.0 KiB"``), tables the default 2.
    """
    for unit in _BYTE_UNITS:
        if abs(n) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
