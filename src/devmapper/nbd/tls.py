"""The server's TLS context from a certificates directory, laid out as nbdkit and qemu expect:

    DIR/server-cert.pem   the server's certificate (chain)
    DIR/server-key.pem    its private key
    DIR/ca-cert.pem       the CA that signs client certificates (needed for ``verify_peer``)

Clients (libnbd's ``tls-certificates=DIR``, qemu's ``tls-creds-x509``) use the same directory
layout with ``client-cert.pem``/``client-key.pem`` and ``ca-cert.pem`` to check the server.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from devmapper.errors import DevmapperError

__all__ = ["server_context"]


def server_context(directory: str | Path, verify_peer: bool = False) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with ``verify_peer`` clients must present a certificate signed by
    ``ca-cert.pem``.  Missing or unreadable files are a ``DevmapperError`` naming the file."""
    d = Path(directory)
    cert, key, ca = d / "server-cert.pem", d / "server-key.pem", d / "ca-cert.pem"
    for f in (cert, key, *((ca,) if verify_peer else ())):
        if not f.is_file():
            raise DevmapperError(f"{f}: no such file (the TLS certificates directory needs it)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if verify_peer:
            ctx.load_verify_locations(cafile=ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as e:
        raise DevmapperError(f"{d}: cannot load the TLS certificates: {e}") from e
    return ctx
