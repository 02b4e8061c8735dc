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


def verify_mac(secret: str, nonce: bytes, mac) -> bool:
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
