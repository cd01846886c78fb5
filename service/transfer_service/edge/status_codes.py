"""Turns a domain error into the gRPC status code its class names (see errors.py)."""

from __future__ import annotations

import grpc

from transfer_service.errors import status_name_of


def status_code_for(error: BaseException) -> grpc.StatusCode:
    return grpc.StatusCode[status_name_of(error)]
