"""The committed stubs are exactly what `protos/generate.py` produces, and every contract follows the
house rules: every field, enum value and rpc documented; enum zero values `<ENUM_NAME>_UNSPECIFIED`.
Picks up every `protos/tokenwire/v1/*.proto` automatically. Comments are read from protoc's own
parse (SourceCodeInfo), not with regexes over the text."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "tokenwire" / "v1"
PROTOS = sorted(PROTO_DIR.glob("*.proto"))
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")

# FileDescriptorProto field numbers, for SourceCodeInfo location paths.
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6  # in a file
_FIELD, _NESTED, _NESTED_ENUM = 2, 3, 4  # in a message
_VALUE, _METHOD = 2, 2  # in an enum, in a service


def generated_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.endswith(GENERATED_SUFFIXES)}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=tmp_path_factory.getbasetemp(),
    )
    return out / "tokenwire" / "v1"


@pytest.fixture(scope="module")
def descriptors(tmp_path_factory) -> list[descriptor_pb2.FileDescriptorProto]:
    """The .proto files as protoc parses them, comments included."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("descriptors") / "set.pb"
    args = ["protoc", f"-I{ROOT / 'protos'}", f"--descriptor_set_out={out}", "--include_source_info"]
    assert protoc.main(args + [str(p) for p in PROTOS]) == 0
    return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


def test_there_are_contracts():
    assert {"common.proto", "tokenizer.proto"} <= {p.name for p in PROTOS}


def test_committed_stubs_are_up_to_date(regenerated):
    fresh, committed = generated_files(regenerated), generated_files(PROTO_DIR)
    expected_names = {p.stem + suffix for p in PROTOS for suffix in GENERATED_SUFFIXES}
    assert set(fresh) == expected_names
    assert set(committed) == expected_names, "stale or missing stubs: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"out of date: {stale}; run `make protos` and commit the result"


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_stubs_import_under_the_package_name(proto):
    module = importlib.import_module(f"tokenwire.v1.{proto.stem}_pb2")
    assert module.DESCRIPTOR.package == "tokenwire.v1"
    importlib.import_module(f"tokenwire.v1.{proto.stem}_pb2_grpc")


def _elements(file: descriptor_pb2.FileDescriptorProto):
    """(kind, location path, name) of every message, field, enum, enum value, service and rpc."""

    def enum(path, e, scope):
        yield "enum", path, f"{scope}{e.name}"
        for i, value in enumerate(e.value):
            yield "enum value", path + (_VALUE, i), f"{scope}{e.name}.{value.name}"

    def message(path, m, scope):
        name = f"{scope}{m.name}"
        yield "message", path, name
        for i, field in enumerate(m.field):
            yield "field", path + (_FIELD, i), f"{name}.{field.name}"
        for i, nested in enumerate(m.nested_type):
            if not nested.options.map_entry:  # synthesised for map<,> fields
                yield from message(path + (_NESTED, i), nested, f"{name}.")
        for i, e in enumerate(m.enum_type):
            yield from enum(path + (_NESTED_ENUM, i), e, f"{name}.")

    for i, m in enumerate(file.message_type):
        yield from message((_MESSAGE, i), m, "")
    for i, e in enumerate(file.enum_type):
        yield from enum((_ENUM, i), e, "")
    for i, service in enumerate(file.service):
        yield "service", (_SERVICE, i), service.name
        for j, method in enumerate(service.method):
            yield "rpc", (_SERVICE, i, _METHOD, j), f"{service.name}.{method.name}"


# What each contract must document; the tokenizer's own files document everything.
REQUIRED_DOCS = {"field", "enum value", "rpc"}
FULLY_DOCUMENTED = {"tokenwire/v1/common.proto", "tokenwire/v1/tokenizer.proto"}


def test_everything_is_documented(descriptors):
    undocumented = []
    for file in descriptors:
        comments = {
            tuple(loc.path): (loc.leading_comments + loc.trailing_comments).strip()
            for loc in file.source_code_info.location
        }
        undocumented += [
            f"{file.name}: {kind} {name}"
            for kind, path, name in _elements(file)
            if (kind in REQUIRED_DOCS or file.name in FULLY_DOCUMENTED) and not comments.get(path)
        ]
    assert not undocumented, "add a comment to: " + ", ".join(undocumented)


def _enums(descriptors):
    def walk(messages):
        for m in messages:
            yield from m.enum_type
            yield from walk(m.nested_type)

    for file in descriptors:
        yield from file.enum_type
        yield from walk(file.message_type)


def test_enum_zero_values_are_unspecified(descriptors):
    enums = list(_enums(descriptors))
    assert enums
    for e in enums:
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", e.name).upper()  # ChatRole -> CHAT_ROLE
        zero = [v.name for v in e.value if v.number == 0]
        assert zero == [f"{prefix}_UNSPECIFIED"], f"{e.name}: zero value must be {prefix}_UNSPECIFIED"
        assert e.value[0].number == 0, f"{e.name}: the zero value comes first"
        unprefixed = [v.name for v in e.value if not v.name.startswith(prefix + "_")]
        assert not unprefixed, f"{e.name}: values must start with {prefix}_ (proto enums share one scope)"


def test_every_contract_is_versioned(descriptors):
    assert {f.package for f in descriptors} == {"tokenwire.v1"}
    assert all(f.syntax == "proto3" for f in descriptors)
