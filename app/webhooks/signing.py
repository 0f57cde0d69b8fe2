"""Signing of webhook bodies, and the check a receiver does (HMAC-SHA256 over ``"<timestamp>." + body``).

The timestamp is part of what is signed so a captured delivery cannot be replayed later: a receiver refuses
signatures whose timestamp is too far from its own clock. Several ``v1=`` values may appear in one header so a
secret can be rotated (sign with both keys for a while) without receivers failing in between.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "Restorelcc-Signature"
DELIVERY_HEADER = "Restorelcc-Delivery"
EVENT_HEADER = "Restorelcc-Event"

# int() of a much longer string is slow or refused (int_max_str_digits); no real clock needs more digits.
_MAX_TIMESTAMP_DIGITS = 18


def _digest(secret: str, body: bytes, timestamp: int) -> str:
    message = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The value of :data:`SIGNATURE_HEADER` for ``body`` sent at ``timestamp`` (Unix seconds)."""
    return f"t={int(timestamp)},v1={_digest(secret, body, int(timestamp))}"


def verify(secret: str, body: bytes, header: str, tolerance_s: float = 300, now: float | None = None) -> bool:
    """True when ``header`` carries a valid signature of ``body`` made within ``tolerance_s`` of ``now``.

    This is what a receiver should run on the raw request body (before any JSON parsing: re-serialising
    changes the bytes). Malformed headers give False, never an exception, so a receiver can answer 400/401
    without a try block. The comparison is constant-time so the signature cannot be guessed byte by byte.
    """
    try:
        if not isinstance(header, str) or not isinstance(body, bytes | bytearray):
            return False
        timestamps: list[str] = []
        candidates: list[str] = []
        for part in header.split(","):
            key, sep, value = part.strip().partition("=")
            if not sep:
                return False
            if key == "t":
                timestamps.append(value.strip())
            elif key == "v1":
                candidates.append(value.strip())
            # Other schemes (v0=, a future v2=) are ignored: a receiver only trusts what it knows.
        if len(timestamps) != 1 or not candidates:
            return False
        t = timestamps[0]
        if not (t.isascii() and t.isdigit()) or len(t) > _MAX_TIMESTAMP_DIGITS:
            return False
        timestamp = int(t)
        current = time.time() if now is None else now
        if abs(current - timestamp) > tolerance_s:
            return False
        expected = _digest(secret, bytes(body), timestamp).encode("ascii")
        matched = False
        for candidate in candidates:
            if not candidate.isascii():
                continue
            # No early exit: every candidate is compared, so timing says nothing about which one matched.
            matched |= hmac.compare_digest(expected, candidate.lower().encode("ascii"))
        return matched
    except Exception:  # a receiver's check must answer, not crash, on whatever arrives
        return False
