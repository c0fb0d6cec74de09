"""The media service's routes: uploads streamed through, listings, and covers passed back as JPEG."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.requests import ClientDisconnect

from services.media.schemas import UPLOAD_SLACK, MediaOut, Uploaded

from ..auth import User
from ..errors import ApiError, ErrorBody
from .common import errors
from .common import proxy as _proxy

router = APIRouter(prefix="/api/v1", responses=errors(400, 503))
MediaId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
_MEDIA_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorBody, "description": "too_large: the file is over MEETMESH_MEDIA_MAX_BYTES"},
    415: {
        "model": ErrorBody,
        "description": "bad_request: not multipart/form-data, or the file is not "
        "an MP4, MOV, WebM or MKV video (judged by its bytes) that ffmpeg can play",
    },
}
_UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "the video: MP4, MOV, WebM or MKV",
                        },
                        "meeting_id": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 64,
                            "pattern": "^[A-Za-z0-9_-]+$",
                            "description": "a meeting you are in, whose participants hear of it",
                        },
                        "cover": {
                            "type": "boolean",
                            "default": True,
                            "description": "queue media.cover (its task id is in the answer)",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "/media",
    status_code=201,
    response_model=Uploaded,
    tags=["media"],
    responses={**errors(401, 403), **_MEDIA_ERRORS},
    openapi_extra=_UPLOAD_FORM,
)
async def upload_media(request: Request, principal: User) -> Response:
    """Upload a video (``multipart/form-data``: ``file``, ``meeting_id?``, ``cover?``), streamed to the media
    service's store. Its type comes from its bytes; over the size limit is 413. Unless ``cover`` is false,
    ``media.cover`` makes its cover (``cover_task_id``; then ``media.cover_ready``)."""
    limit: int = request.app.state.media_max_bytes + UPLOAD_SLACK
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        if not length.isdigit():
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        raise ApiError(413, "too_large", f"the upload is over the limit of {limit - UPLOAD_SLACK} bytes")
    over = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal over
        seen = 0
        try:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    over = True
                    return
                yield chunk
        except ClientDisconnect:
            return

    headers = {"Content-Type": request.headers.get("content-type", "")}
    if length is not None:
        headers["Content-Length"] = length
    answer = await _proxy(request).send("media", "POST", "/media", principal, content=body(), headers=headers)
    if over:
        raise ApiError(413, "too_large", f"the upload is over the limit of {limit - UPLOAD_SLACK} bytes")
    return answer


@router.get("/media", response_model=list[MediaOut], tags=["media"], responses=errors(401))
async def my_media(
    request: Request,
    principal: User,
    meeting_id: Annotated[str | None, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Response:
    """Your uploads (of one meeting, if given), newest first."""
    return await _proxy(request).send(
        "media", "GET", "/media", principal, params={"meeting_id": meeting_id, "limit": limit}
    )


@router.get("/media/{media_id}", response_model=MediaOut, tags=["media"], responses=errors(401, 404))
async def get_media(request: Request, principal: User, media_id: MediaId) -> Response:
    """An upload: what it is, its cover's state and its transcodes (yours; admins see any; 404 otherwise)."""
    return await _proxy(request).send("media", "GET", f"/media/{media_id}", principal)


@router.get(
    "/media/{media_id}/cover",
    response_class=Response,
    tags=["media"],
    responses={
        200: {
            "description": "the cover, a JPEG",
            "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
        },
        **errors(401, 404),
    },
)
async def media_cover(request: Request, principal: User, media_id: MediaId) -> Response:
    """An upload's cover (a JPEG frame), once ``media.cover`` made it: 404 until then (saying why)."""
    return await _proxy(request).send("media", "GET", f"/media/{media_id}/cover", principal)
