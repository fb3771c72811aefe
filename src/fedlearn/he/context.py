"""CKKS key material. One secret context is made once (`fedlearn he-keys` or `create_keys`) and given to every
client out of band; the server gets the same context serialized without the secret key, enough to parse and add
ciphertexts and nothing more. Addition needs no relinearisation or Galois keys, so none are made or shipped."""
from __future__ import annotations

import tenseal as ts

POLY_MODULUS_DEGREE = 8192  # 4096 slots per ciphertext; 128-bit security with the moduli below
COEFF_MOD_BIT_SIZES = (60, 40, 60)
SCALE_BITS = 40  # about 1e-7 absolute precision after a few hundred additions
SLOTS = POLY_MODULUS_DEGREE // 2  # values one ciphertext holds


class HEKeyError(ValueError):
    """A context that is not what it must be (a secret key on the server, none on a client, or not CKKS)."""


def create_keys() -> tuple[bytes, bytes]:
    """A fresh CKKS key: (secret context for the clients, public context for the server)."""
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=POLY_MODULUS_DEGREE,
                         coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES))
    context.global_scale = 2**SCALE_BITS
    secret = context.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    public = context.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    return secret, public


def load_public(raw: bytes) -> ts.Context:
    """The server's context; refuses one that carries the secret key (the server must never hold it)."""
    context = _load(raw)
    if context.is_private():
        raise HEKeyError("this CKKS context holds the secret key: give the server the public context only "
                         "(the secret key stays with the clients)")
    return context


def load_secret(raw: bytes) -> ts.Context:
    """A client's context, which must hold the secret key."""
    context = _load(raw)
    if not context.is_private():
        raise HEKeyError("this CKKS context has no secret key: clients need the secret context to decrypt")
    return context


def _load(raw: bytes) -> ts.Context:
    try:
        context = ts.context_from(bytes(raw))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise HEKeyError(f"not a serialized TenSEAL context: {exc}") from None
    if not context.is_public() and not context.is_private():
        raise HEKeyError("the context holds no public key")
    return context
