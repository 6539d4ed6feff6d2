"""TLS for the gRPC server: the certificate, key and (for mutual TLS) client CA files, checked at start.

    monim serve --tls-cert server.pem --tls-key server.key [--tls-client-ca clients-ca.pem]

Every file is read and checked before anything starts (``ServerTls.load``): it exists, can be
read, holds PEM of the right kind, the key is not passphrase-protected (gRPC cannot use one)
and matches the certificate. A problem raises InvalidArgument naming the file and the problem.
With a client CA the server requires every client to present a certificate signed by it.
"""

from __future__ import annotations

import dataclasses
import ssl

import grpc
from monim.protos.errors import InvalidArgument
from monim.workers.server_files import read_bytes


def _read_pem(path: str, what: str, marker: str) -> bytes:
    """The file's bytes, which must hold a PEM block whose type ends with ``marker``."""
    data = read_bytes(path, what)
    if not any(line.startswith(b"-----BEGIN ") and line.rstrip().endswith(marker.encode() + b"-----")
               for line in data.splitlines()):
        raise InvalidArgument(f"{what} {path}: no PEM '{marker}' block in it")
    return data


@dataclasses.dataclass(frozen=True)
class ServerTls:
    """PEM bytes of the server's certificate chain and key, and of the CA that signs client
    certificates (None: clients are not asked for one)."""

    certificate_chain: bytes = dataclasses.field(repr=False)
    private_key: bytes = dataclasses.field(repr=False)
    client_ca: bytes | None = dataclasses.field(default=None, repr=False)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    @classmethod
    def load(cls, cert_file: str | None, key_file: str | None, client_ca_file: str | None = None) -> "ServerTls | None":
        """None when no file is given (plaintext); else the checked files."""
        if cert_file is None and key_file is None:
            if client_ca_file is not None:
                raise InvalidArgument(f"TLS client CA {client_ca_file}: mutual TLS needs a server certificate "
                                      "and key too (--tls-cert, --tls-key)")
            return None
        if cert_file is None or key_file is None:
            given, missing = ("--tls-key", "--tls-cert") if cert_file is None else ("--tls-cert", "--tls-key")
            raise InvalidArgument(f"TLS: {given} {key_file or cert_file} needs {missing} as well")
        chain = _read_pem(cert_file, "TLS certificate", "CERTIFICATE")
        key = _read_pem(key_file, "TLS key", "PRIVATE KEY")
        if b"ENCRYPTED" in key or b"Proc-Type: 4,ENCRYPTED" in key:
            raise InvalidArgument(f"TLS key {key_file}: it is protected by a passphrase, which gRPC cannot use; "
                                  "write it unencrypted (openssl pkey -in KEY -out KEY.plain) and chmod 600 it")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # password: a key that still wants one fails here instead of prompting on the terminal.
            context.load_cert_chain(cert_file, key_file, password=lambda: b"")
        except ssl.SSLError as error:
            if "KEY_VALUES_MISMATCH" in str(error):
                raise InvalidArgument(f"TLS key {key_file} does not match the certificate {cert_file}") from None
            raise InvalidArgument(f"TLS certificate {cert_file} / key {key_file}: cannot be loaded "
                                  f"({error.reason or error})") from None
        client_ca = None
        if client_ca_file is not None:
            client_ca = _read_pem(client_ca_file, "TLS client CA", "CERTIFICATE")
            try:
                ssl.create_default_context(cadata=client_ca.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as error:
                raise InvalidArgument(f"TLS client CA {client_ca_file}: not a usable CA certificate "
                                      f"({getattr(error, 'reason', None) or error})") from None
        return cls(chain, key, client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)],
                                           root_certificates=self.client_ca, require_client_auth=self.mutual)
