import hashlib
import hmac

from bai_agent.protocol.auth import NONCE_LENGTH, compute_mac, new_nonce, verify_mac

SECRET = "ab" * 32


def test_mac_is_hmac_sha256_of_the_nonce_keyed_with_the_secret_text():
    nonce = b"n" * 32
    expected = hmac.new(SECRET.encode(), nonce, hashlib.sha256).hexdigest()
    assert compute_mac(SECRET, nonce) == expected


def test_verify_accepts_exactly_the_lowercase_hex_digest():
    nonce = new_nonce()
    assert len(nonce) == NONCE_LENGTH
    mac = compute_mac(SECRET, nonce)
    assert verify_mac(SECRET, nonce, hmac.new(SECRET.encode(), nonce, hashlib.sha256).hexdigest())
    assert not verify_mac(SECRET, nonce, mac.upper())
    assert not verify_mac(SECRET, nonce, f" {mac}\n")
    assert not verify_mac(SECRET, nonce, mac[:-1])
    assert not verify_mac(SECRET, nonce, mac + "0")


def test_verify_rejects_what_is_not_ascii_text_without_raising():
    nonce = new_nonce()
    mac = compute_mac(SECRET, nonce)
    for given in (mac.encode(), None, 42, [mac], mac[:-1] + "\u00e9", "\udcff" * 64, "\x00" * 64):
        assert verify_mac(SECRET, nonce, given) is False


def test_verify_rejects_wrong_mac_other_nonce_and_garbage():
    nonce = new_nonce()
    assert not verify_mac(SECRET, nonce, compute_mac("cd" * 32, nonce))
    assert not verify_mac(SECRET, nonce, compute_mac(SECRET, new_nonce()))
    assert not verify_mac(SECRET, nonce, "")
    assert not verify_mac(SECRET, nonce, "\u00e9" * 64)


def test_nonces_differ():
    assert new_nonce() != new_nonce()
