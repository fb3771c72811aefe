"""Credentials for a deployment, made with `cryptography`: a private CA, the server's TLS certificate,
and one bundle per client (CA certificate, client TLS certificate for mutual TLS, Ed25519 identity key),
plus the server's allow-list of client identities.

Layout of the output folder::

    ca.pem  ca.key              the CA (keep ca.key offline; it signs every certificate)
    server.pem  server.key      the server's TLS certificate, valid for the names given
    allowlist.txt               client id -> identity public key, read by the server
    operator.token              the operator's secret for `fedlearn status` (mode 0600; keep it private)
    operator.token.sha256       its SHA-256, which is all the server holds
    clients/<id>/               copy this folder to the client's machine, and nothing else
        client_id  identity.key  ca.pem  client.pem  client.key

Running it again on the same folder keeps the CA, the server certificate and existing clients, and adds
the new clients. Private keys are created exclusively with mode 0600 (never through a symlink, never over an
existing file unless `force`).
"""
from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .channels import ClientTLS
from .identity import AllowList, Identity, IdentityError, check_client_id, write_private
from .status_auth import OPERATOR_TOKEN_HASH, create_operator_token

CA_YEARS, LEAF_YEARS = 10, 2
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class ClientBundle:
    """What a client process needs, read from one `clients/<id>/` folder."""

    client_id: str
    identity: Identity
    tls: ClientTLS

    @classmethod
    def load(cls, folder: str | Path) -> "ClientBundle":
        folder = Path(folder)
        id_file = folder / "client_id"
        if not id_file.exists():
            raise IdentityError(f"{folder} is not a client credentials folder (no client_id file); "
                                "create one with `fedlearn certs`")
        cert, key = folder / "client.pem", folder / "client.key"
        has_cert = cert.exists() and key.exists()
        tls = ClientTLS(folder / "ca.pem", cert if has_cert else None, key if has_cert else None)
        return cls(check_client_id(id_file.read_text().strip()), Identity.load(folder / "identity.key"), tls)


def create(out: str | Path, client_ids: Sequence[str], server_names: Sequence[str] = DEFAULT_SERVER_NAMES, *,
           force: bool = False) -> list[Path]:
    """Create (or extend) the credentials folder `out`; returns the new client bundle folders. A private key
    file left in the way (say, by an interrupted earlier run) is refused unless `force` replaces it."""
    out = Path(out)
    for cid in client_ids:
        check_client_id(cid)
    if len(set(client_ids)) != len(client_ids):
        raise IdentityError("client ids must be unique")
    ca_key, ca_cert = _load_or_create_ca(out, force)
    if not (out / "server.pem").exists():
        names = list(dict.fromkeys([*server_names, *DEFAULT_SERVER_NAMES]))
        _write_leaf(out / "server.pem", out / "server.key", ca_key, ca_cert, "fedlearn server", names, server=True,
                    force=force)
    if not (out / OPERATOR_TOKEN_HASH).exists():
        create_operator_token(out, force=force)
    allow = out / "allowlist.txt"
    registered = AllowList.load(allow).keys if allow.exists() else {}
    taken = [cid for cid in client_ids if cid in registered]
    if taken:
        raise IdentityError(f"client(s) {', '.join(taken)} already exist in {allow}; choose new ids")
    if not allow.exists():
        allow.write_text("# client_id  ed25519-public-key-hex  (one registered client per line)\n")
    created = []
    for cid in client_ids:
        folder = out / "clients" / cid
        identity = Identity.generate()
        identity.save(folder / "identity.key", force=force)
        (folder / "client_id").write_text(cid + "\n")
        (folder / "ca.pem").write_bytes(_pem(ca_cert))
        _write_leaf(folder / "client.pem", folder / "client.key", ca_key, ca_cert, cid, [], server=False,
                    force=force)
        with allow.open("a") as f:
            f.write(AllowList.line(cid, identity.public_hex))
        created.append(folder)
    return created


def create_identity(folder: str | Path, client_id: str, *, force: bool = False) -> str:
    """Make only an identity key on the client's own machine; returns the allow-list line to send to the
    server's operator (the private key never leaves the machine). An existing key is kept unless `force`."""
    folder = Path(folder)
    identity = Identity.generate()
    identity.save(folder / "identity.key", force=force)
    (folder / "client_id").write_text(check_client_id(client_id) + "\n")
    return AllowList.line(client_id, identity.public_hex)


def _load_or_create_ca(out: Path, force: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = out / "ca.key", out / "ca.pem"
    if cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlearn CA")])
    cert = (_builder(name, name, key.public_key(), CA_YEARS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    write_private(key_path, _key_pem(key), force=force)
    cert_path.write_bytes(_pem(cert))
    return key, cert


def _write_leaf(cert_path: Path, key_path: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                common_name: str, names: Sequence[str], *, server: bool, force: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(subject, ca_cert.subject, key.public_key(), LEAF_YEARS)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
    write_private(key_path, _key_pem(key), force=force)
    cert_path.write_bytes(_pem(builder.sign(ca_key, hashes.SHA256())))


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             years: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365 * years)))


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
