"""Refusals the daemon answers with, each carrying the gRPC status to use.

Handlers raise these (or a dirtytrack.errors exception); servicer.py turns
them into a status with a message a person can act on, plus google.rpc
details (BadRequest, ErrorInfo, ResourceInfo) where a program can use them.
"""
from __future__ import annotations

DOMAIN = "dirtytrack.dev"


class DaemonError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(DaemonError):
    """INVALID_ARGUMENT, naming the field."""
    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class NotFound(DaemonError):
    """NOT_FOUND, naming the resource."""
    code = "NOT_FOUND"

    def __init__(self, resource_type: str, name: str, message: str):
        super().__init__(message)
        self.resource_type = resource_type
        self.name = name


class Precondition(DaemonError):
    """FAILED_PRECONDITION with a machine-readable reason (google.rpc.ErrorInfo)."""
    code = "FAILED_PRECONDITION"

    def __init__(self, reason: str, message: str, **metadata: str):
        super().__init__(message)
        self.reason = reason
        self.metadata = {k: str(v) for k, v in metadata.items()}


class Superseded(DaemonError):
    """ABORTED: a newer Subscribe or Collect took this cursor over."""
    code = "ABORTED"


class ShuttingDown(DaemonError):
    code = "UNAVAILABLE"
