"""Security: optional TLS (and mutual TLS) on both services with the SDK's credentials, optional
bearer-token auth on every RPC but health, and no code from a checkpoint run unless a flag says so.
Certificates come from a throwaway CA made at test time; servers are in-process on port 0."""

from __future__ import annotations

import ast
import datetime
import ipaddress
import json
import shutil
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tokenwire.client import AuthenticationError, Client, RetryPolicy, UnavailableError
from tokenwire.engine.cli import build_parser as engine_parser
from tokenwire.engine.config import CacheConfig, EngineConfig, ServerConfig
from tokenwire.engine.core.engine import LLMEngine
from tokenwire.serving.security import TlsConfigError, server_credentials
from tokenwire.tokenizer.cli import build_parser as tokenizer_parser
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.tokenizer.tokenizer import load_tokenizer
from tokenwire.v1 import engine_pb2 as epb
from tokenwire.v1 import engine_pb2_grpc, tokenizer_pb2_grpc
from tokenwire.v1 import tokenizer_pb2 as tpb

from tests.reference import ENGINE_DTYPE
from tests.servers import EngineThread, TokenizerThread

TOKEN = "s3cret-token"
ONE_TRY = RetryPolicy(max_attempts=1)
REPO = Path(__file__).resolve().parent.parent


# ---- a throwaway PKI ----


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, key=None, cert=None) -> str:
    if key is not None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    else:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """Paths of a CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    out = tmp_path_factory.mktemp("pki")
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _cert("tokenwire test CA", ca_key, ca=True)
    return {
        "ca": _write(out / "ca.pem", cert=ca),
        "server_cert": _write(out / "server.pem", cert=_cert("localhost", server_key, ca, ca_key, server=True)),
        "server_key": _write(out / "server.key", key=server_key),
        "client_cert": _write(out / "client.pem", cert=_cert("client", client_key, ca, ca_key)),
        "client_key": _write(out / "client.key", key=client_key),
    }


# ---- servers: the engine with TLS and auth, the tokenizer with mutual TLS and auth ----


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, pki):
    config = EngineConfig(model=tiny_llama_dir, dtype=ENGINE_DTYPE, cache=CacheConfig(num_blocks=64))
    server = EngineThread(
        config, ServerConfig(port=0, tls_cert=pki["server_cert"], tls_key=pki["server_key"], auth_token=TOKEN)
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir, pki):
    server = TokenizerThread(
        TokenizerServiceConfig(
            model=smollm2_dir,
            port=0,
            tls_cert=pki["server_cert"],
            tls_key=pki["server_key"],
            tls_client_ca=pki["ca"],
            auth_token=TOKEN,
        )
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def engine_channel(engine, pki):
    credentials = grpc.ssl_channel_credentials(Path(pki["ca"]).read_bytes())
    with grpc.secure_channel(engine.address, credentials) as channel:
        yield channel


def _mtls(pki) -> grpc.ChannelCredentials:
    read = lambda name: Path(pki[name]).read_bytes()  # noqa: E731
    return grpc.ssl_channel_credentials(
        read("ca"), private_key=read("client_key"), certificate_chain=read("client_cert")
    )


# ---- TLS ----


def test_sdk_over_tls_generates(engine, pki):
    with Client(tokenizer=None, engine=engine.address, tls_root_cert=pki["ca"], auth_token=TOKEN, timeout=30) as client:
        completion = client.complete(token_ids=[1, 2, 3], max_new_tokens=4, ignore_eos=True)
    assert completion.usage.completion_tokens == 4


def test_plaintext_client_cannot_talk_to_a_tls_server(engine):
    with Client(tokenizer=None, engine=engine.address, auth_token=TOKEN, retry=ONE_TRY, timeout=10) as client:
        with pytest.raises(UnavailableError):
            client.model_info()


def test_mutual_tls_requires_a_client_certificate(tokenizer, pki):
    with Client(
        tokenizer=tokenizer.address, engine="127.0.0.1:1", credentials=_mtls(pki), auth_token=TOKEN, timeout=30
    ) as client:
        assert client.encode("Hello world")
    with Client(
        tokenizer=tokenizer.address,
        engine="127.0.0.1:1",
        tls_root_cert=Path(pki["ca"]).read_bytes(),
        auth_token=TOKEN,
        retry=ONE_TRY,
        timeout=10,
    ) as client:
        with pytest.raises(UnavailableError):  # the handshake fails without a client certificate
            client.encode("Hello world")


def test_half_a_tls_configuration_is_refused(pki):
    with pytest.raises(TlsConfigError, match="go together"):
        server_credentials(pki["server_cert"], "")
    with pytest.raises(TlsConfigError, match="needs"):
        server_credentials("", "", pki["ca"])
    assert server_credentials("", "") is None  # plaintext


# ---- bearer-token auth ----


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)],
    ids=["no token", "wrong token", "no Bearer scheme"],
)
def test_every_engine_rpc_needs_the_token(engine_channel, metadata):
    stub = engine_pb2_grpc.EngineServiceStub(engine_channel)
    request = epb.GenerateRequest(token_ids=epb.TokenIds(ids=[1, 2]), sampling=epb.SamplingParams(max_new_tokens=2))
    calls = [
        lambda: list(stub.Generate(request, metadata=metadata, timeout=10)),
        lambda: stub.GenerateBatch(epb.GenerateBatchRequest(requests=[request]), metadata=metadata, timeout=10),
        lambda: stub.GetModelInfo(epb.GetModelInfoRequest(), metadata=metadata, timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_right_token_works_and_health_is_open(engine_channel):
    stub = engine_pb2_grpc.EngineServiceStub(engine_channel)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    assert stub.GetModelInfo(epb.GetModelInfoRequest(), metadata=auth, timeout=10).vocab_size == 49152
    health = health_pb2_grpc.HealthStub(engine_channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    # Reflection lists the whole API: it needs the token like any other RPC.
    reflection = reflection_pb2_grpc.ServerReflectionStub(engine_channel)
    ask = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    with pytest.raises(grpc.RpcError) as err:
        list(reflection.ServerReflectionInfo(ask, timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tokenizer_rpcs_need_the_token(tokenizer, pki):
    with grpc.secure_channel(tokenizer.address, _mtls(pki)) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Encode(tpb.EncodeRequest(text="hi"), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Encode(
            tpb.EncodeRequest(text="hi"), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10
        ).ids
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        )


def test_sdk_sends_the_token_from_its_argument_or_the_environment(engine, pki, monkeypatch):
    options = dict(tokenizer=None, engine=engine.address, tls_root_cert=pki["ca"], timeout=30)
    with Client(auth_token="wrong", **options) as client, pytest.raises(AuthenticationError):
        client.model_info()
    monkeypatch.setenv("TOKENWIRE_AUTH_TOKEN", TOKEN)
    with Client(**options) as client:
        assert client.model_info().vocab_size == 49152
        assert list(client.generate(token_ids=[1, 2], max_new_tokens=2, ignore_eos=True))[-1].finish_reason


# ---- no code from a checkpoint ----


@pytest.fixture(scope="module")
def checkpoint_with_code(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A model folder whose config and tokenizer name custom classes in a bundled .py file; importing
    that file writes a marker, so a test can tell whether it ran."""
    folder = tmp_path_factory.mktemp("remote-code") / "model"
    shutil.copytree(tiny_llama_dir, folder)
    marker = folder.parent / "code-ran"
    (folder / "custom_code.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llm'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    _edit_json(
        folder / "config.json",
        model_type="custom-llm",
        architectures=["CustomModel"],
        auto_map={"AutoConfig": "custom_code.CustomConfig", "AutoModelForCausalLM": "custom_code.CustomModel"},
    )
    _edit_json(
        folder / "tokenizer_config.json",
        tokenizer_class="CustomTokenizer",
        auto_map={"AutoTokenizer": [None, "custom_code.CustomTokenizer"]},
    )
    return folder, marker


def test_checkpoint_code_never_runs_by_default(checkpoint_with_code):
    folder, marker = checkpoint_with_code
    with pytest.raises(ValueError, match="trust_remote_code"):
        LLMEngine(EngineConfig(model=str(folder), dtype=ENGINE_DTYPE, cache=CacheConfig(num_blocks=16)))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_tokenizer(str(folder))
    assert not marker.exists()
    assert engine_parser().parse_args([]).trust_remote_code is False
    assert tokenizer_parser().parse_args([]).trust_remote_code is False


def test_the_flag_is_what_lets_checkpoint_code_run(checkpoint_with_code):
    folder, marker = checkpoint_with_code
    args = tokenizer_parser().parse_args(["--trust-remote-code"])
    load_tokenizer(str(folder), args.trust_remote_code)
    assert marker.read_text() == "ran"


def test_no_loader_hardcodes_trust_remote_code():
    """Every from_pretrained in the services either leaves trust_remote_code at its safe default or
    passes the configured flag; none passes a literal True."""
    folders = ("engine_service", "tokenizer_service", "serving", "bench")
    for path in [path for folder in folders for path in REPO.glob(f"{folder}/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), path


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
