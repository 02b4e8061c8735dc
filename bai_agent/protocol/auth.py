"""
Connection authentication (PROTOCOL.md section 1).

The MAC is the hex HMAC-SHA256 of the connection's nonce, keyed with the namespace secret
exactly as stored in etcd (the hex text's UTF-8 bytes, not the bytes it decodes to), so
that an operator-supplied secret needs no decoding to be usable.
"""

import hashlib
import hmac
import os
import re

NONCE_LENGTH = 32

# A namespace secret: at least 32 bytes of randomness, written as hex.
SECRET_PATTERN = re.compile(r"[0-9a-fA-F]{64,}\Z")


def is_valid_secret(text: object) -> bool:
    """Whether ``text`` is a usable namespace secret (at least 64 hex digits, nothing else)."""
    return isinstance(text, str) and SECRET_PATTERN.match(text) is not None


def read_secret_file(path: str) -> str:
    """
    The secret in the file ``path``, whitespace around it stripped. ``ValueError`` naming
    the file when it cannot be read or holds no valid secret. Blocking: the agent calls it
    at start-up or off the reactor thread.
    """
    try:
        with open(path, encoding="utf-8") as secret_file:
            text = secret_file.read(4096).strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise ValueError(f"cannot read the secret file {path}: {reason}") from None
    if not is_valid_secret(text):
        raise ValueError(f"the secret file {path} must hold at least 64 hex digits (32 bytes)")
    return text


def new_nonce() -> bytes:
    return os.urandom(NONCE_LENGTH)


def compute_mac(secret: str, nonce: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), nonce, hashlib.sha256).hexdigest()


def verify_mac(secret: str, nonce: bytes, mac: object) -> bool:
    """
    Whether ``mac`` is exactly what ``compute_mac`` gives (lowercase hex, nothing around
    it), compared in constant time. Anything else, another type or text that is not
    ASCII included, is ``False``, never an exception.
    """
    if not isinstance(mac, str):
        return False
    try:
        given = mac.encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(compute_mac(secret, nonce).encode("ascii"), given)
