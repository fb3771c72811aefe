"""Homomorphic-encryption aggregation (CKKS through TenSEAL) for cross-silo federations: clients hold the
secret key, the server only the public context; it adds the clients' ciphertexts and a few clients decrypt
the sum. Needs `pip install -e ".[he]"` (TenSEAL)."""
from .context import create_keys, load_public, load_secret
from .protocol import DECRYPT, ENCRYPTED, HEAbort, HEClient, HEConfig, HEProtocol

__all__ = ["HEProtocol", "HEClient", "HEConfig", "HEAbort", "create_keys", "load_public", "load_secret",
           "ENCRYPTED", "DECRYPT"]
