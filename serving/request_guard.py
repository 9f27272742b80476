"""Requests that do not parse become INVALID_ARGUMENT naming the field, for both services.

proto3 `string` fields must hold UTF-8, and protobuf refuses to parse a message where one does not: bad
UTF-8 never reaches a tokenizer. But grpc python reports any parse failure as UNKNOWN ("Unexpected
DecodeError"), which names no field and reads like a server bug. This interceptor swaps each method's
request deserializer for a tolerant one that hands the handler a `MalformedRequest` instead of raising,
and answers it with INVALID_ARGUMENT: `text: not valid UTF-8`, `messages[1].content: ...`, or
`request: not a valid EncodeRequest message` when the bytes are not protobuf at all.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import DecodeError, Message
from tokenwire.serving.errors import FIELD_METADATA_KEY


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request message that failed to parse."""

    field: str  # path of the offending field, or "request" when the bytes are not the message at all
    problem: str


class _Malformed(BaseException):
    """Ends a streaming handler at a malformed message. A BaseException so that a handler's own
    `except Exception` (which maps surprises to INTERNAL) lets it through to this interceptor."""

    def __init__(self, request: MalformedRequest):
        super().__init__(request.problem)
        self.request = request


class RequestGuard(grpc.aio.ServerInterceptor):
    """Install last (innermost), so auth and observability see the call first."""

    def __init__(self) -> None:
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        guarded = self._guarded.get(details.method)
        if guarded is None:  # handlers are fixed per method: wrap each one once
            guarded = self._guarded[details.method] = _guard(handler)
        return guarded


def tolerant_deserializer(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserializer`, returning a MalformedRequest where it would raise DecodeError."""
    message_cls = getattr(deserializer, "__self__", None)  # `SomeRequest.FromString` is a bound classmethod

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError:
            if isinstance(message_cls, type) and issubclass(message_cls, Message):
                return locate_problem(message_cls.DESCRIPTOR, raw)
            return MalformedRequest("request", "not a valid request message")

    return parse


def locate_problem(descriptor: Descriptor, raw: bytes) -> MalformedRequest:
    """Why `raw` does not parse as `descriptor`: a string field with bad UTF-8 (named), or corrupt bytes."""
    try:
        shadow = _bytes_shadow(descriptor).FromString(raw)
    except DecodeError:
        return MalformedRequest("request", f"not a valid {descriptor.name} message")
    path = _bad_utf8_path(descriptor, shadow, "")
    if path is None:  # not expected: the shadow differs only in string -> bytes
        return MalformedRequest("request", f"not a valid {descriptor.name} message")
    return MalformedRequest(path, "not valid UTF-8")


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    serde = dict(
        request_deserializer=tolerant_deserializer(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary), **serde)
    if handler.unary_stream:
        behaviour = handler.unary_stream
        wrapped = _unary_stream(behaviour) if inspect.isasyncgenfunction(behaviour) else _unary(behaviour)
        return grpc.unary_stream_rpc_method_handler(wrapped, **serde)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_stream_unary(handler.stream_unary), **serde)
    return grpc.stream_stream_rpc_method_handler(_stream_stream(handler.stream_stream), **serde)


async def _refuse(context: grpc.aio.ServicerContext, bad: MalformedRequest) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{bad.field}: {bad.problem}",
        trailing_metadata=((FIELD_METADATA_KEY, bad.field),),
    )


def _unary(behaviour):
    @functools.wraps(behaviour)
    async def guarded(request, context):
        if isinstance(request, MalformedRequest):
            await _refuse(context, request)
        return await behaviour(request, context)

    return guarded


def _unary_stream(behaviour):
    @functools.wraps(behaviour)
    async def guarded(request, context):
        if isinstance(request, MalformedRequest):
            await _refuse(context, request)
        async for response in behaviour(request, context):
            yield response

    return guarded


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, MalformedRequest):
            raise _Malformed(request)
        yield request


def _stream_unary(behaviour):
    @functools.wraps(behaviour)
    async def guarded(requests, context):
        try:
            return await behaviour(_checked(requests), context)
        except _Malformed as bad:
            await _refuse(context, bad.request)

    return guarded


def _stream_stream(behaviour):
    @functools.wraps(behaviour)
    async def guarded(requests, context):
        try:
            if inspect.isasyncgenfunction(behaviour):
                async for response in behaviour(_checked(requests), context):
                    yield response
            else:
                await behaviour(_checked(requests), context)
        except _Malformed as bad:
            await _refuse(context, bad.request)

    return guarded


# ---- naming the field with bad UTF-8 ----


@functools.cache
def _bytes_shadow(descriptor: Descriptor) -> type[Message]:
    """A message class with `descriptor`'s wire layout but every string field typed bytes, so a message
    with bad UTF-8 parses and the field can be found. Built once per request type."""
    pool = descriptor_pool.DescriptorPool()
    _add_file(pool, descriptor.file, set())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(descriptor.full_name))


def _add_file(pool: descriptor_pool.DescriptorPool, file: FileDescriptor, added: set[str]) -> None:
    if file.name in added:
        return
    added.add(file.name)
    for dependency in file.dependencies:
        _add_file(pool, dependency, added)
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    for message in proto.message_type:
        _strings_to_bytes(message)
    pool.Add(proto)


def _strings_to_bytes(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
            field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    for nested in message.nested_type:
        _strings_to_bytes(nested)


def _bad_utf8_path(descriptor: Descriptor, shadow: Message, prefix: str) -> str | None:
    for shadow_field, value in shadow.ListFields():
        field = descriptor.fields_by_name[shadow_field.name]
        path = prefix + field.name
        items = list(enumerate(value)) if field.is_repeated else [(None, value)]
        for index, item in items:
            item_path = path if index is None else f"{path}[{index}]"
            if field.type == FieldDescriptor.TYPE_STRING and not _is_utf8(item):
                return item_path
            if field.type == FieldDescriptor.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
                found = _bad_utf8_path(field.message_type, item, item_path + ".")
                if found is not None:
                    return found
    return None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
