"""Registers TransferService with request parsing that never fails inside grpc.

grpc's own deserializer turns bytes that are not a valid protobuf message into UNKNOWN.
Here a parse failure yields a `MalformedRequest` instead, and the servicer's wrappers answer
it with INVALID_ARGUMENT like any other bad input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from transfer_client.proto import transfer_service_pb2 as pb

from transfer_service.errors import InvalidArgumentError

SERVICE = pb.DESCRIPTOR.services_by_name["TransferService"]


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    message_type: str
    reason: str

    def error(self) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"request: bytes are not a valid {self.message_type} message ({self.reason})"
        )


def lenient_parser(message_class: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_class.FromString(data)
        except (DecodeError, RuntimeWarning, ValueError) as exc:
            return MalformedRequest(message_class.DESCRIPTOR.full_name, str(exc) or "undecodable")

    return parse


def add_transfer_service(servicer: Any, server: grpc.aio.Server) -> None:
    handlers = {}
    for method in SERVICE.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            behaviour,
            request_deserializer=lenient_parser(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
