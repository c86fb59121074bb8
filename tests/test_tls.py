"""Mutual TLS on the data plane (`app.py --tls`, cluster.tls), on 127.0.0.1 only.

- the CA signs a good certificate request and refuses bad ones with a reason;
- the control channel hands out certificates only after the join token, bound to it both
  ways, and refuses a missing, malformed, oversized or swapped request with a reason;
- a tiny model's ring over mutual TLS gives the single-process tokens, while a plaintext
  client, a client with another CA's certificate, and a member posing as another stage are
  refused; a worker's stage server switches to TLS (and to a new master's CA) on registration;
- a real `--tls` master with a join token and two real workers gives the same greedy text as
  the single process, refuses plaintext and foreign clients, and after a restart (a new CA)
  adopts its workers with their new certificates."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import re

import grpc
import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cluster.control_client import ControlClient, control_url
from cluster.control_messages import (
    Challenge,
    ProtocolError,
    Registered,
    auth_digest,
    parse,
    tls_proof,
)
from cluster.stage_endpoint import StageEndpoint
from cluster.stage_server import StageServicer
from cluster.stage_stream import GRPC_OPTIONS
from cluster.tls import TLS_NAME, ClusterCA, NodeTLS, check_issued, make_csr, new_key, open_channel
from proto import stage_pb2, stage_pb2_grpc

from .conftest import QUESTIONS, free_port
from .test_cluster import TOKEN, Proc, chat, healthy, status, wait_for
from .test_control import CAPACITY, Master, run
from .tiny_ring import GREEDY, tiny_ring, worker_tls


def registered(cert: str | None = None, ca: str | None = None, proof: str = "") -> Registered:
    return Registered(
        node_id="w1", heartbeat_interval=1, heartbeat_timeout=5, tls_cert=cert, tls_ca=ca, tls_proof=proof
    )


def tampered(csr_pem: str) -> str:
    """The same request with one bit of its signature flipped."""
    der = bytearray(x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 1
    b64 = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{b64}-----END CERTIFICATE REQUEST-----\n"


def rsa_csr(bits: int) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "weak")])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )


# ---- the CA --------------------------------------------------------------------------------


def test_the_ca_names_and_limits_what_it_signs_and_refuses_bad_requests():
    ca = ClusterCA()
    key = new_key()
    csr = make_csr(key, "asked-for-anything")
    cert = x509.load_pem_x509_certificate(ca.sign(csr, "w1").encode())
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "w1"  # ours, not the CSR's
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == [TLS_NAME]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.ca_pem.encode()))
    bad = {
        "not pem": ("hello", "malformed certificate request"),
        "bad signature": (tampered(csr), "signature does not verify"),
        "weak rsa": (rsa_csr(1024), "1024-bit RSA key"),
        "oversized": ("-----BEGIN CERTIFICATE REQUEST-----\n" + "A" * 5000, "over 4096 bytes"),
    }
    for name, (pem, reason) in bad.items():
        with pytest.raises(ValueError, match=reason):
            ca.sign(pem, "w1")
        assert name
    assert ca.sign(rsa_csr(2048), "w2")
    # A worker checks what it got: a certificate for another key, or from another CA, is refused.
    with pytest.raises(ValueError, match="not for this worker's key"):
        check_issued(new_key(), ca.sign(csr, "w1"), ca.ca_pem)
    with pytest.raises(ValueError, match="does not check out"):
        check_issued(key, ca.sign(csr, "w1"), ClusterCA().ca_pem)


# ---- the control channel -------------------------------------------------------------------


async def tls_register(url: str, node_id: str, csr: str | None, token: str | None = TOKEN, auth_csr=None):
    """A hand-driven worker: register with `csr` (its auth covers `auth_csr`, default `csr`)."""
    async with websockets.connect(control_url(url), proxy=None) as ws:
        challenge = parse(await ws.recv())
        assert isinstance(challenge, Challenge) and challenge.tls
        signed = csr if auth_csr is None else auth_csr
        auth = auth_digest(token, challenge.nonce, node_id, signed) if token else ""
        register = dict(v=1, type="register", node_id=node_id, grpc_address="127.0.0.1:1", capacity=CAPACITY)
        await ws.send(json.dumps(dict(register, auth=auth, csr=csr)))  # not Register(): it would refuse a bad csr
        return challenge, parse(await ws.recv())


def test_certificate_requests_are_signed_only_after_the_token_and_bad_ones_refused_with_a_reason():
    async def main():
        ca = ClusterCA()
        m = await Master(token=TOKEN, ca=ca).start()
        key = new_key()
        csr = make_csr(key, "w1")
        cases = {
            "none": (None, None, "the worker sent no certificate request"),
            "not pem": ("hello", None, "invalid register: csr: String should match pattern"),
            "oversized": (
                "-----BEGIN CERTIFICATE REQUEST-----\n"
                + ("A" * 64 + "\n") * 80
                + "-----END CERTIFICATE REQUEST-----\n",
                None,
                "invalid register: csr: String should have at most 4096 characters",
            ),
            "bad signature": (tampered(csr), None, "bad certificate request: the certificate request's signature"),
            "garbage body": (
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                None,
                "bad certificate request: malformed",
            ),
            "weak key": (rsa_csr(1024), None, "bad certificate request: certificate request with a 1024-bit RSA key"),
            # Someone on the path swaps in their own key under the worker's proof: the proof covers the CSR.
            "swapped": (make_csr(new_key(), "w1"), csr, "bad join token"),
        }
        for name, (pem, auth_csr, reason) in cases.items():
            _, reply = await tls_register(m.url, "w1", pem, auth_csr=auth_csr)
            assert reply.type == "refused" and reason in reply.reason, (name, reply)
        assert m.server.workers() == []
        challenge, reply = await tls_register(m.url, "w1", csr)
        assert isinstance(reply, Registered) and reply.tls_ca == ca.ca_pem
        assert reply.tls_proof == tls_proof(TOKEN, challenge.nonce, "w1", ca.ca_pem, reply.tls_cert)
        check_issued(key, reply.tls_cert, reply.tls_ca)
        await m.stop()

    run(main())


def test_a_worker_refuses_certificates_without_the_join_token_proof():
    client = ControlClient(["http://127.0.0.1:1"], "w1", TOKEN, dict, None, None)  # type: ignore[arg-type]
    ca, challenge = ClusterCA(), Challenge(nonce="ab" * 16, tls=True)
    cert = ca.sign(make_csr(new_key(), "w1"), "w1")
    good = tls_proof(TOKEN, challenge.nonce, "w1", ca.ca_pem, cert)
    client._check_tls(challenge, registered(cert, ca.ca_pem, good))
    for proof in ("", tls_proof("another token", challenge.nonce, "w1", ca.ca_pem, cert)):
        with pytest.raises(ProtocolError, match="without a valid join-token proof"):
            client._check_tls(challenge, registered(cert, ca.ca_pem, proof))
    with pytest.raises(ProtocolError, match="does not match the challenge"):
        client._check_tls(challenge, registered())


# ---- the data plane ------------------------------------------------------------------------


def health(address: str, tls: NodeTLS | None) -> str:
    """The stage's node id over `tls` (None: plaintext); raises grpc.RpcError if refused."""
    with open_channel(address, tls, GRPC_OPTIONS) as channel:
        return stage_pb2_grpc.StageStub(channel).Health(stage_pb2.HealthRequest(), timeout=5).node_id


def results_stream(address: str, tls: NodeTLS | None, metadata, msg) -> grpc.StatusCode | None:
    """The status a one-message Master.Results stream ends with (None: answered)."""
    with open_channel(address, tls, GRPC_OPTIONS) as channel:
        try:
            next(stage_pb2_grpc.MasterStub(channel).Results(iter([msg]), metadata=metadata, timeout=10))
        except grpc.RpcError as e:
            return e.code()
    return None


@pytest.fixture(scope="module")
def tls_ring(tmp_path_factory):
    """Stage s1 [0, 2) → s2 [2, 4) → the master's result endpoint, every hop mutual TLS."""
    with tiny_ring(str(tmp_path_factory.mktemp("tiny")), ClusterCA()) as r:
        yield r


def test_a_ring_over_mutual_tls_gives_the_single_process_tokens(tls_ring):
    got = [g[0] for g in tls_ring.engine.generate(tls_ring.prompts, GREEDY)]
    assert got == tls_ring.expected and tls_ring.results.results > 0 and tls_ring.results.errors == 0


def test_plaintext_and_foreign_ca_clients_are_refused_in_the_handshake(tls_ring):
    member = worker_tls(tls_ring.ca, "s9")
    foreign = ClusterCA()
    forged = foreign.node_tls("s1")
    strangers = {
        "plaintext": None,
        "another CA's certificate": foreign.node_tls("s1"),
        # A certificate of another CA, even from a client that trusts our CA for the server.
        "another CA's certificate, our root": NodeTLS(forged.key, forged.cert, tls_ring.ca.ca_pem.encode()),
    }
    msg = stage_pb2.StepResponse(step_id=1, error="forged")
    keys = tls_ring.plan.stage_keys("s2").results_metadata("s2")
    for name, tls in strangers.items():
        with pytest.raises(grpc.RpcError) as e:
            health(tls_ring.first, tls)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, name
        # Even with the right HMAC credentials: no certificate of this cluster, no stream.
        assert results_stream(tls_ring.reply_to, tls, keys, msg) == grpc.StatusCode.UNAVAILABLE, name
    assert health(tls_ring.first, member) == "s1"  # a member gets through the handshake
    # ... but a member's certificate does not make it another stage: s2's keys need s2's certificate.
    assert results_stream(tls_ring.reply_to, member, keys, msg) == grpc.StatusCode.UNAUTHENTICATED
    got = [g[0] for g in tls_ring.engine.generate(tls_ring.prompts, GREEDY)]
    assert got == tls_ring.expected


def test_a_workers_stage_server_takes_up_tls_at_registration_and_a_new_masters_ca():
    servicer = StageServicer("w1")
    endpoint = StageEndpoint(servicer, "127.0.0.1", 0)
    address = endpoint.address
    try:
        assert health(address, None) == "w1"  # before joining: plaintext, as the Register's address promised
        cas = [ClusterCA(), ClusterCA()]
        for ca in cas:  # a master, then a restarted master: a new CA, the same key and port
            run(endpoint.on_registered(registered(ca.sign(endpoint.csr, "w1"), ca.ca_pem)))
            assert endpoint.address == address and servicer.tls is not None
            assert health(address, ca.node_tls()) == "w1"
            with pytest.raises(grpc.RpcError):
                health(address, None)
        with pytest.raises(grpc.RpcError):  # the first master's CA is no longer trusted
            health(address, cas[0].node_tls())
        with pytest.raises(ValueError, match="not for this worker's key"):
            run(endpoint.on_registered(registered(cas[1].sign(make_csr(new_key(), "w1"), "w1"), cas[1].ca_pem)))
        run(endpoint.on_registered(registered()))
        assert servicer.tls is None and health(address, None) == "w1"  # a master without --tls
    finally:
        endpoint.stop(grace=0)


# ---- real processes ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_tls_cluster_gives_the_same_greedy_text_and_refuses_plaintext(tmp_path, expected):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    master_args = ["app.py", "--no-ui", "--port", str(port), "--workers", "2", "--quant", "none", "--tls"]
    master_args += ["--join-token", TOKEN, "--kv-cache-gb", "0.1", "--max-batch", "8"]
    procs = {"master": Proc(master_args, tmp_path / "master.log")}
    try:
        for name in ("w1", "w2"):
            args = ["-m", "cluster.worker", "--master", base, "--join-token", TOKEN, "--node-id", name]
            procs[name] = Proc(args, tmp_path / f"{name}.log")
        wait_for(lambda: healthy(base), 240, "the TLS cluster to serve", list(procs.values()))
        s = status(base)
        assert s["tls"] is True and s["cluster"]["mode"] == "pipeline"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda q: chat(base, q), QUESTIONS))
        assert got == expected
        ring = status(base)["cluster"]["ring"]
        assert ring["results"] > 0 and ring["errors"] == 0
        for name in ("w1", "w2"):
            assert "now serves mutual TLS" in procs[name].text()
        # Nobody without a certificate of this master's CA gets through the handshake.
        stages = [n["address"] for n in s["nodes"] if n["state"] == "ready" and n["node_id"] != "master"]
        results = f"127.0.0.1:{ring['port']}"
        for tls in (None, ClusterCA().node_tls("w1")):
            for address in stages:
                with pytest.raises(grpc.RpcError) as e:
                    health(address, tls)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            forged = stage_pb2.StepResponse(step_id=1, error="forged")
            assert results_stream(results, tls, (), forged) == grpc.StatusCode.UNAVAILABLE
        assert re.search(r"ring results endpoint on .* \(mutual TLS\)", procs["master"].text())
        # A restarted master is a new CA: the workers re-register, take up its certificates
        # without a server restart, and are adopted without reloading their layers.
        procs["master"].stop()
        procs["master"] = Proc(master_args, tmp_path / "master2.log")
        wait_for(lambda: healthy(base), 120, "the restarted TLS master to serve", list(procs.values()))
        assert status(base)["cluster"]["loads"] == {"w1": 1, "w2": 1}
        assert chat(base, QUESTIONS[2]) == expected[2]
        for name in ("w1", "w2"):
            text = procs[name].text()
            assert (
                text.count("now serves mutual TLS") == 1
                and "switched to the certificate of the new master's CA" in text
            )
    finally:
        for p in procs.values():
            p.stop()
