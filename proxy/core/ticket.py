"""SPICE ticket cryptography: pure functions of bytes (CPU work, no I/O).

Wire facts (spice-server reds.c, spice-gtk spice-channel.c): the server's LinkReply carries
an RSA-1024 public key as DER SubjectPublicKeyInfo in 162 bytes; the client encrypts its
password *with the terminating NUL* using RSA-OAEP (OpenSSL's RSA_PKCS1_OAEP_PADDING: SHA-1
and MGF1-SHA-1, no label) into the 128-byte ticket; the server decrypts it and compares it
as a C string, so anything after the first NUL is ignored. The server decrypts the ticket
even when ticketing is disabled and refuses the link if that fails, so a proxy that swaps
the key must always re-encrypt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

PUB_KEY_SIZE = 162  # SPICE_TICKET_PUBKEY_BYTES = 1024 / 8 + 34
TICKET_SIZE = 128  # SPICE_TICKET_KEY_PAIR_LENGTH / 8
MAX_PASSWORD = 60  # SPICE_MAX_PASSWORD_LENGTH


class TicketError(ValueError):
    """A ticket or key that cannot be used (the message never holds a secret)."""


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


@dataclass(frozen=True)
class TicketKey:
    """spicetap's own key pair, shown to viewers instead of the server's (intercept,
    inject). Made fresh per proxy run; never written anywhere."""

    private: rsa.RSAPrivateKey = field(repr=False)
    public_der: bytes

    @classmethod
    def generate(cls) -> TicketKey:
        private = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if len(der) != PUB_KEY_SIZE:  # a 1024-bit modulus with e=65537 always gives 162
            raise TicketError(f"generated public key is {len(der)} bytes, not {PUB_KEY_SIZE}")
        return cls(private, der)

    def decrypt(self, ticket: bytes) -> bytes:
        """The password a viewer encrypted for us, up to its NUL (as spice-server reads it)."""
        try:
            plain = self.private.decrypt(ticket, _oaep())
        except ValueError:
            raise TicketError("ticket does not decrypt with spicetap's key") from None
        return plain.split(b"\0", 1)[0]


def encrypt_ticket(public_der: bytes, password: bytes) -> bytes:
    """The 128-byte ticket for `password` under a server's DER public key."""
    if len(password) > MAX_PASSWORD or b"\0" in password:
        raise TicketError(f"a SPICE password has at most {MAX_PASSWORD} bytes and no NUL")
    # a shorter key would be NUL-padded to 162 bytes; DER never ends in 0 (odd exponent)
    try:
        key = serialization.load_der_public_key(public_der.rstrip(b"\0"))
    except ValueError:
        raise TicketError("the server's public key is not a DER RSA key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise TicketError("the server's public key is not an RSA key")
    ticket = key.encrypt(password + b"\0", _oaep())
    if len(ticket) != TICKET_SIZE:
        raise TicketError(f"the server's key gives {len(ticket)}-byte tickets, not 128")
    return ticket
