"""Mutual TLS for the data plane (`python app.py --tls`): the master is the cluster's CA.

The master generates a CA key and certificate when it starts (they live in its memory only,
so the CA's life is the master process's: a restarted master is a new CA, and its workers
get new certificates when they re-register). It issues itself a certificate for its result
endpoint and its hop to stage 1. A worker generates its own key and sends a certificate
request (CSR) in its Register; the master signs it only after the join-token check, and
returns the certificate with the CA's in Registered. Every gRPC server of the cluster (the
stages, the master's result endpoint) then serves with a certificate of that CA and requires
a client certificate of the same CA, and every channel presents its node's own.

Names: every certificate carries one fixed DNS name, `TLS_NAME`, and every channel checks
the peer for it (`grpc.ssl_target_name_override`) whatever address it dials. Stages dial each
other by the address a worker claims in its Register (or one a NAT, a wildcard bind or
--advertise-host decides), which the master cannot verify, so an IP in the SAN would add no
assurance and would break behind NAT. What the certificate proves is "a member of this
cluster" (the master signs only for workers that proved the join token); which member may do
what is still checked by the per-plan HMAC keys (cluster.data_auth), and a result stream's
certificate must also name the stage its credentials claim to be (`peer_node`).

The CSR's subject and extensions are ignored: the master sets the certificate's name (the
node id, at most 64 characters) and uses itself. A CSR is refused (ValueError, a reason fit to
send back) unless it is PEM, at most MAX_CSR_BYTES, correctly self-signed, over an EC
P-256/P-384 or RSA 2048-4096 key."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .control_messages import MAX_CSR_BYTES

TLS_NAME = "ringllm-node"  # the one DNS name in every certificate of a cluster
CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", TLS_NAME)]
_VALIDITY = datetime.timedelta(days=3650)  # the CA dies with the master process: that is the real expiry
_SKEW = datetime.timedelta(days=1)  # clocks of machines that have never met may differ
_CURVES = (ec.SECP256R1, ec.SECP384R1)


@dataclass(frozen=True, slots=True)
class NodeTLS:
    """One node's TLS identity, all PEM: its private key, its certificate signed by the
    cluster's CA, and the CA certificate it trusts (and requires of its peers)."""

    key: bytes
    cert: bytes
    ca: bytes

    def server_config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], root_certificates=self.ca)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: a client without a certificate of our CA is refused in the handshake."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def open_channel(address: str, tls: NodeTLS | None, options: list[tuple[str, Any]]) -> grpc.Channel:
    """A channel to a peer of the cluster: plaintext without `tls`, else mutual TLS that
    expects the peer's certificate to carry TLS_NAME."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.channel_credentials(), options=[*options, *CHANNEL_OPTIONS])


def peer_node(context: grpc.ServicerContext) -> str | None:
    """The common name (a node id) of a TLS peer's certificate; None on a plaintext call."""
    # A property's values, a list of bytes at run time (the stub says bytes).
    names = cast(list[bytes], context.auth_context().get("x509_common_name") or [])
    return names[0].decode(errors="replace") if len(names) == 1 else None


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_csr(key: ec.EllipticCurvePrivateKey, node_id: str) -> str:
    """A worker's certificate request (PEM). Its subject is informational: the master names the certificate."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id[:64])])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def check_issued(key: ec.EllipticCurvePrivateKey, cert_pem: str, ca_pem: str) -> NodeTLS:
    """A worker's check of what the master returned: the certificate is for our key and signed
    by the CA that came with it. ValueError otherwise."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        ca = x509.load_pem_x509_certificate(ca_pem.encode())
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise ValueError(f"the master's certificate does not check out: {e}") from None
    if cert.public_key() != key.public_key():
        raise ValueError("the master's certificate is not for this worker's key")
    return NodeTLS(key_pem(key), cert_pem.encode(), ca_pem.encode())


def _check_csr(pem: str) -> x509.CertificateSigningRequest:
    if len(pem.encode()) > MAX_CSR_BYTES:
        raise ValueError(f"certificate request over {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
        key = csr.public_key()
        valid = csr.is_signature_valid
    except (ValueError, TypeError, x509.UnsupportedGeneralNameType):
        raise ValueError("malformed certificate request (expected one PEM CSR)") from None
    if not valid:
        raise ValueError("the certificate request's signature does not verify")
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _CURVES):
            raise ValueError(f"certificate request on curve {key.curve.name[:20]}; use P-256 or P-384")
    elif isinstance(key, rsa.RSAPublicKey):
        if not 2048 <= key.key_size <= 4096:
            raise ValueError(f"certificate request with a {key.key_size}-bit RSA key; use 2048 to 4096 bits")
    else:
        raise ValueError("certificate request with an unsupported key type; use EC P-256")
    return csr


class ClusterCA:
    """The master's certificate authority. Invariant: every certificate it signs names a node
    id as its common name, carries TLS_NAME as its only SAN, may serve and dial (server and
    client auth), and cannot sign others; the CA key never leaves this object."""

    def __init__(self) -> None:
        self._key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ringllm cluster CA")])
        now = datetime.datetime.now(datetime.UTC)
        self._name = name
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # key_cert_sign, crl_sign
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_pem = self._cert.public_bytes(serialization.Encoding.PEM).decode()

    def _issue(self, public_key: Any, node_id: str) -> str:
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
            .issuer_name(self._name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
            )  # digital_signature (ECDHE, TLS 1.3), key_encipherment (RSA key exchange)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    def sign(self, csr_pem: str, node_id: str) -> str:
        """The certificate (PEM) for the key in `csr_pem`, named `node_id`. Call it only for a
        worker that proved the join token. ValueError (a reason fit to send back) for a bad CSR."""
        if not 1 <= len(node_id) <= 64:  # an X.509 common name holds at most 64 characters
            raise ValueError("a node id for a certificate has 1 to 64 characters")
        return self._issue(_check_csr(csr_pem).public_key(), node_id)

    def node_tls(self, node_id: str = "master") -> NodeTLS:
        """A fresh key and certificate for the master's own endpoints."""
        key = new_key()
        return NodeTLS(key_pem(key), self._issue(key.public_key(), node_id).encode(), self.ca_pem.encode())
