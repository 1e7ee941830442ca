"""The error bodies a client of A1111 meets, in their two shapes.

FastAPI's own (`{"detail": ...}`) comes from routing (404, 405) and validation (422,
see `validation.py`).  A1111's `api_middleware` turns every other exception into
`{"error", "detail", "body", "errors"}`; `ApiError` carries one of those.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class ApiError(Exception):
    """An answer in A1111's error shape.

    `HTTPException`s put their text in `detail`; any other exception is a 500 whose
    text (`str(exc)`) goes in `errors`.
    """

    status: int
    error: str
    detail: str = ""
    errors: str = ""

    @classmethod
    def http(cls, status: int, detail: str) -> ApiError:
        """Like raising FastAPI's `HTTPException(status, detail)` inside A1111."""
        return cls(status, "HTTPException", detail=detail)

    @classmethod
    def from_exception(cls, exc: BaseException) -> ApiError:
        """Like any other exception escaping an A1111 route: 500."""
        return cls(500, type(exc).__name__, errors=str(exc))

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "detail": self.detail, "body": "", "errors": self.errors}
