"""A throw-away PKI for the TLS tests, made with openssl: a site CA that signs a server's and
our (the gateway's) certificate, and another CA nobody uses."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.peers import missing_peer


@dataclass(frozen=True)
class Pki:
    ca: Path  # signs the server's and our certificates
    other_ca: Path  # a CA nobody here uses
    server_cert: Path  # CN and SAN the server's name, SAN IP 127.0.0.1
    server_key: Path
    client_cert: Path  # the gateway
    client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (key, certificate)."""
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
        "-out", str(cert), "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return key, cert


def make_leaf(folder: Path, name: str, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    """A certificate for ``name`` with ``san``, signed by ``ca``: (certificate, key)."""
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    ext = folder / f"{name}.ext"
    ext.write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", f"/CN={name}")  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
             "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(ext))  # fmt: skip
    return cert, key


def make_pki(folder: Path, server_name: str) -> Pki:
    """The site CA, the other CA, ``server_name``'s certificate and ours, in ``folder``."""
    if shutil.which("openssl") is None:
        missing_peer("openssl is not installed")
    ca = make_ca(folder, "site-ca")
    _, other = make_ca(folder, "other-ca")
    server = make_leaf(folder, server_name, ca, f"DNS:{server_name},IP:127.0.0.1")
    client = make_leaf(folder, "cxrgw.test", ca, "DNS:cxrgw.test")
    return Pki(ca[1], other, server[0], server[1], client[0], client[1])
