"""The media service's REST (the gateway serves it under ``/api/v1``, same paths)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse
from starlette.requests import ClientDisconnect

from services.common import BadRequest, Caller

from .library import COVER_FILE, Library
from .schemas import MediaOut, Uploaded

MediaPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
MeetingQuery = Annotated[str | None, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
COVER_NAME = COVER_FILE  # the name a saved cover gets (Content-Disposition), never the client's
NOSNIFF = {"X-Content-Type-Options": "nosniff"}


def routes(library: Library) -> APIRouter:
    router = APIRouter(prefix="/media", tags=["media"])

    @router.post("", status_code=201)
    async def upload(actor: Caller, request: Request) -> Uploaded:
        """``multipart/form-data``: ``file`` (an MP4, MOV, WebM or MKV video), ``meeting_id?``,
        ``cover?`` (default true: queue ``media.cover``)."""
        return await library.upload(actor, request.headers.get("content-type"),
                                    request.headers.get("content-length"), _body(request))

    @router.get("")
    async def mine(actor: Caller, meeting_id: MeetingQuery = None,
                   limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[MediaOut]:
        return await library.mine(actor, meeting_id, limit)

    @router.get("/{media_id}")
    async def get(actor: Caller, media_id: MediaPath) -> MediaOut:
        return await library.get(actor, media_id)

    @router.get("/{media_id}/cover", response_class=FileResponse)
    async def cover(actor: Caller, media_id: MediaPath) -> FileResponse:
        # its bytes were checked to be a JPEG; browsers must not guess another type from them
        return FileResponse(await library.cover_file(actor, media_id), media_type="image/jpeg",
                            filename=COVER_NAME, content_disposition_type="inline", headers=NOSNIFF)

    return router


async def _body(request: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; a client that goes away mid-upload is a 400 (nobody reads it)."""
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise BadRequest("the upload was interrupted") from None
