"""
Connection authentication (PROTOCOL.md section 1).

The MAC is the hex HMAC-SHA256 of the connection's nonce, keyed with the namespace secret
exactly as stored in etcd (the hex text's UTF-8 bytes, not the bytes it decodes to), so
that an operator-supplied secret needs no decoding to be usable.
"""

import hashlib
import hmac
import os

NONCE_LENGTH = 32


def new_nonce() -> bytes:
    return os.urandom(NONCE_LENGTH)


def compute_mac(secret: str, nonce: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), nonce, hashlib.sha256).hexdigest()


def verify_mac(secret: str, nonce: bytes, mac: str) -> bool:
    expected = compute_mac(secret, nonce)
    return hmac.compare_digest(expected.encode("ascii"), mac.strip().lower().encode("utf-8"))
