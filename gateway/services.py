"""The services' REST under /api/v1, proxied: accounts (user service), meetings (meeting service) and
media (media service: uploads streamed through, covers passed back as JPEG).

Each route is declared here with the service's own request and response models (so the gateway's
OpenAPI document shows them and bad input is refused here, 400, before any hop), verifies the
bearer token locally (no round trip), and forwards the request with httpx to the service's port,
adding the caller in ``X-MeetMesh-User`` / ``X-MeetMesh-Roles`` and the gateway key
(`services.common.identity`). The service's answer, success or JSON error, is passed through; a
service that cannot be reached (or fails) answers 503 ``unavailable``.

Where each service is: ``MEETMESH_USER_URL`` / ``MEETMESH_MEETING_URL`` / ``MEETMESH_MEDIA_URL``, by
default ``http://127.0.0.1:<MEETMESH_USER_PORT or 8101>``, ``<MEETMESH_MEETING_PORT or 8102>`` and
``<MEETMESH_MEDIA_PORT or 8103>``.

Also here: `may_follow`, the WebSocket's check that only a meeting's participants (and admins)
subscribe to ``meeting.<id>``, read from the participant sets the meeting service keeps in Redis.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Body, FastAPI, Path, Query, Request, Response
from pydantic import BaseModel
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.requests import ClientDisconnect  # media

from services.common import Actor, ServiceError, identity_headers
from services.media.schemas import UPLOAD_SLACK, MediaOut, Uploaded  # media
from services.meeting.presence import Presence
from services.meeting.schemas import (
    CHAT_PAGE_MAX,
    ChatMessageOut,
    ChatPage,
    ChatPost,
    KickRequest,
    MeetingCreate,
    MeetingOut,
    Target,
)
from services.user.schemas import (
    LoginRequest,
    ProfileUpdate,
    RegisterRequest,
    RolesUpdate,
    TokenOut,
    UserOut,
)

from .auth import Principal, User
from .errors import ApiError, ErrorBody
from .settings import GatewaySettings

log = logging.getLogger(__name__)
TIMEOUT_SECONDS = 10.0


class ServiceUrls(BaseSettings):
    """Where the services answer (``MEETMESH_<NAME>_URL``, else the local default port)."""

    model_config = SettingsConfigDict(env_prefix="MEETMESH_", extra="ignore")

    service_host: str = "127.0.0.1"
    user_port: int = 8101
    meeting_port: int = 8102
    user_url: str | None = None
    meeting_url: str | None = None
    # media: where it is, and the upload limit (MEETMESH_MEDIA_MAX_BYTES, as the service's): a larger
    # upload is refused here, before any hop
    media_port: int = 8103
    media_url: str | None = None
    media_max_bytes: int = 100 * 1024 * 1024

    def urls(self) -> dict[str, str]:
        return {
            "user": self.user_url or f"http://{self.service_host}:{self.user_port}",
            "meeting": self.meeting_url or f"http://{self.service_host}:{self.meeting_port}",
            "media": self.media_url or f"http://{self.service_host}:{self.media_port}",  # media
        }


class ServiceProxy:
    """One pooled HTTP client for every service; `call` forwards one request."""

    def __init__(self, urls: Mapping[str, str], secret: str, *, timeout: float = TIMEOUT_SECONDS) -> None:
        self.urls = {name: url.rstrip("/") for name, url in urls.items()}
        self.secret = secret
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    async def call(
        self,
        service: str,
        method: str,
        path: str,
        principal: Principal | None,
        *,
        body: BaseModel | None = None,
        params: Mapping[str, Any] | None = None,
        public: bool = False,
    ) -> Response:
        """Forward to ``service``; its answer as a `Response`, or `ApiError` 503 if it has none."""
        json = body.model_dump(mode="json", exclude_unset=True) if body is not None else None
        answer = await self._forward(service, method, path, principal, params, public=public, json=json)
        return Response(answer.content, status_code=answer.status_code, media_type="application/json")

    # -- media: raw bodies (an upload streamed through, a JPEG passed back) -----------------------

    async def send(
        self,
        service: str,
        method: str,
        path: str,
        principal: Principal,
        *,
        content: AsyncIterator[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Response:
        """Like `call`, with the request body streamed from ``content`` (as is, with ``headers``) and the
        answer's own content type kept."""
        answer = await self._forward(
            service, method, path, principal, params, content=content, headers=headers
        )
        kind = answer.headers.get("content-type", "application/json")
        # the service's checked type and file name pass through; nobody may sniff another type
        kept = {k: v for k, v in answer.headers.items() if k.lower() == "content-disposition"}
        return Response(answer.content, status_code=answer.status_code, media_type=kind,
                        headers={**kept, "X-Content-Type-Options": "nosniff"})

    async def _forward(
        self,
        service: str,
        method: str,
        path: str,
        principal: Principal | None,
        params: Mapping[str, Any] | None,
        *,
        public: bool = False,
        json: Any = None,
        content: AsyncIterator[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One request to ``service`` with the caller's identity; the service's failures become 503."""
        if self._client is None:
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
            self._client = httpx.AsyncClient(timeout=self.timeout, limits=limits)
        actor = Actor(principal.user, principal.roles) if principal is not None else None
        request = self._client.build_request(
            method,
            self.urls[service] + path,
            json=json,
            content=content,
            params={k: v for k, v in (params or {}).items() if v is not None},
            headers={**identity_headers(self.secret, actor), **(headers or {})},
        )
        try:
            answer = await self._client.send(request)
        except httpx.TimeoutException:
            raise ApiError(503, "unavailable", f"the {service} service did not answer in time") from None
        except httpx.TransportError as exc:
            log.warning("the %s service is unreachable: %r", service, exc)
            message = f"the {service} service is unreachable; try again shortly"
            raise ApiError(503, "unavailable", message) from None
        if answer.status_code >= 500 or (answer.status_code == 401 and not public):
            # 401 past the gateway's own check: the service refused our key (MEETMESH_JWT_SECRET differs)
            log.error("the %s service answered %s %s: %s", service, method, path, answer.text[:500])
            raise ApiError(503, "unavailable", f"the {service} service failed; try again shortly")
        return answer

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def install(app: FastAPI, settings: GatewaySettings) -> None:
    """Serve the services' REST on ``app`` (the proxy is ``app.state.services``)."""
    app.include_router(router)
    urls = ServiceUrls()
    app.state.services = ServiceProxy(urls.urls(), settings.jwt_secret)
    app.state.media_max_bytes = urls.media_max_bytes  # media


async def may_follow(state: Any, principal: Principal, topic: str) -> None:
    """`ApiError` 403 unless ``principal`` may subscribe to ``topic`` (a checked pattern): a pattern that
    could take a meeting's topic must name one meeting (``meeting.<id>``) whose participants include the
    caller; admins may follow any. Other topics are not the meeting service's to guard."""
    parts = topic.split(".")
    meetingish = parts[0] == ">" or (parts[0] in ("meeting", "*") and len(parts) > 1)
    if not meetingish or principal.is_admin:
        return
    if parts[0] != "meeting" or parts[1] in ("*", ">"):
        raise ApiError(403, "forbidden", "follow one meeting at a time, as a participant: meeting.<id>")
    try:
        inside = await Presence(state.redis, state.settings.key_prefix).contains(parts[1], principal.user)
    except ServiceError as exc:
        raise ApiError(503, "unavailable", exc.message) from None
    if not inside:
        raise ApiError(403, "forbidden", f"only the participants of meeting {parts[1]} may follow it")


# -- routes ---------------------------------------------------------------------------------------


class ConflictInfo(BaseModel):
    code: Literal["conflict"]
    message: str


class ConflictBody(BaseModel):
    """409: the current state forbids the request."""

    error: ConflictInfo


_DESCRIPTIONS = {
    400: "bad_request: malformed or invalid input (`details` says where), or a request that makes no sense",
    401: "unauthorized: no valid bearer token",
    403: "forbidden: not allowed (only the host, a participant or an admin may)",
    404: "not_found: no such user, meeting or participant",
    503: "unavailable: the service is unreachable; try again shortly",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in statuses if s != 409
    }
    if 409 in statuses:
        out[409] = {
            "model": ConflictBody,
            "description": "conflict: the current state forbids it "
            "(a taken username, a meeting that has ended, a user not in the meeting)",
        }
    return out


router = APIRouter(prefix="/api/v1", responses=errors(400, 503))
UserId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
MeetingId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
MEETING = errors(401, 403, 404, 409)


def _proxy(request: Request) -> ServiceProxy:
    proxy: ServiceProxy = request.app.state.services
    return proxy


@router.post("/auth/register", status_code=201, response_model=TokenOut, tags=["auth"], responses=errors(409))
async def register(request: Request, body: RegisterRequest) -> Response:
    """Create an account and get a token. Usernames are unique whatever their case; 409 if taken."""
    return await _proxy(request).call("user", "POST", "/auth/register", None, body=body, public=True)


@router.post("/auth/login", response_model=TokenOut, tags=["auth"], responses=errors(401))
async def login(request: Request, body: LoginRequest) -> Response:
    """A token for a username and password (401 without saying which was wrong)."""
    return await _proxy(request).call("user", "POST", "/auth/login", None, body=body, public=True)


@router.get("/users/me", response_model=UserOut, tags=["users"], responses=errors(401, 404))
async def me(request: Request, principal: User) -> Response:
    """Your profile (404 when the token's user has no account, e.g. a token minted by hand)."""
    return await _proxy(request).call("user", "GET", "/users/me", principal)


@router.patch("/users/me", response_model=UserOut, tags=["users"], responses=errors(401, 404))
async def update_me(request: Request, principal: User, body: ProfileUpdate) -> Response:
    """Change your email and/or display name (null clears one)."""
    return await _proxy(request).call("user", "PATCH", "/users/me", principal, body=body)


@router.get("/users", response_model=list[UserOut], tags=["users"], responses=errors(401, 403))
async def list_users(
    request: Request,
    principal: User,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> Response:
    """Every account, oldest first (admins)."""
    return await _proxy(request).call(
        "user", "GET", "/users", principal, params={"limit": limit, "offset": offset}
    )


@router.get("/users/{user_id}", response_model=UserOut, tags=["users"], responses=errors(401, 403, 404))
async def get_user(request: Request, principal: User, user_id: UserId) -> Response:
    """A profile: your own, or anyone's for an admin."""
    return await _proxy(request).call("user", "GET", f"/users/{user_id}", principal)


@router.put("/users/{user_id}/roles", response_model=UserOut, tags=["users"], responses=errors(401, 403, 404))
async def set_roles(request: Request, principal: User, user_id: UserId, body: RolesUpdate) -> Response:
    """Set a user's roles (admins); they take effect with the user's next token."""
    return await _proxy(request).call("user", "PUT", f"/users/{user_id}/roles", principal, body=body)


@router.post("/meetings", status_code=201, response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def create_meeting(
    request: Request, principal: User, body: Annotated[MeetingCreate | None, Body()] = None
) -> Response:
    """Create a meeting (``{title?}``): you host it and are its first participant."""
    return await _proxy(request).call("meeting", "POST", "/meetings", principal, body=body or MeetingCreate())


@router.get("/meetings", response_model=list[MeetingOut], tags=["meetings"], responses=errors(401))
async def my_meetings(
    request: Request,
    principal: User,
    status: Literal["active", "ended"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Response:
    """The meetings you host or are in now, newest first."""
    return await _proxy(request).call(
        "meeting", "GET", "/meetings", principal, params={"status": status, "limit": limit}
    )


@router.get("/meetings/{meeting_id}", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def get_meeting(request: Request, principal: User, meeting_id: MeetingId) -> Response:
    """A meeting and who is in it now (its participants, past and present, its host and admins)."""
    return await _proxy(request).call("meeting", "GET", f"/meetings/{meeting_id}", principal)


async def _act(
    request: Request, principal: Principal, meeting_id: str, action: str, body: BaseModel | None = None
) -> Response:
    return await _proxy(request).call(
        "meeting", "POST", f"/meetings/{meeting_id}/{action}", principal, body=body
    )


@router.post("/meetings/{meeting_id}/join", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def join_meeting(request: Request, principal: User, meeting_id: MeetingId) -> Response:
    """Join an active meeting (again, after leaving; not after being removed). Then subscribe to
    ``meeting.<id>`` on the WebSocket for its live updates."""
    return await _act(request, principal, meeting_id, "join")


@router.post("/meetings/{meeting_id}/leave", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def leave_meeting(request: Request, principal: User, meeting_id: MeetingId) -> Response:
    return await _act(request, principal, meeting_id, "leave")


@router.post("/meetings/{meeting_id}/end", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def end_meeting(request: Request, principal: User, meeting_id: MeetingId) -> Response:
    """End the meeting (the host, or an admin)."""
    return await _act(request, principal, meeting_id, "end")


@router.post("/meetings/{meeting_id}/mute", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def mute(
    request: Request, principal: User, meeting_id: MeetingId, body: Annotated[Target | None, Body()] = None
) -> Response:
    """Mute yourself, or (the host) another participant: ``{user_id}``."""
    return await _act(request, principal, meeting_id, "mute", body)


@router.post("/meetings/{meeting_id}/unmute", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def unmute(
    request: Request, principal: User, meeting_id: MeetingId, body: Annotated[Target | None, Body()] = None
) -> Response:
    """Unmute yourself, or (the host) another participant: ``{user_id}``."""
    return await _act(request, principal, meeting_id, "unmute", body)


@router.post("/meetings/{meeting_id}/kick", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def kick(request: Request, principal: User, meeting_id: MeetingId, body: KickRequest) -> Response:
    """Remove a participant (the host, or an admin); they may not rejoin."""
    return await _act(request, principal, meeting_id, "kick", body)


@router.post(
    "/meetings/{meeting_id}/chat",
    status_code=201,
    response_model=ChatMessageOut,
    tags=["meetings"],
    responses=MEETING,
)
async def post_chat(request: Request, principal: User, meeting_id: MeetingId, body: ChatPost) -> Response:
    """Say something in the meeting (participants): stored, and sent live on ``meeting.<id>`` as
    the event ``meeting.chat``."""
    return await _act(request, principal, meeting_id, "chat", body)


@router.get("/meetings/{meeting_id}/chat", response_model=ChatPage, tags=["meetings"], responses=MEETING)
async def read_chat(
    request: Request,
    principal: User,
    meeting_id: MeetingId,
    after: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=CHAT_PAGE_MAX)] = 100,
) -> Response:
    """The meeting's chat in order; page with ``after=next_after``."""
    return await _proxy(request).call(
        "meeting", "GET", f"/meetings/{meeting_id}/chat", principal, params={"after": after, "limit": limit}
    )


# -- media (the media service) --------------------------------------------------------------------

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
