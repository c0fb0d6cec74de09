"""The proxy to the services: where each one answers (`ServiceUrls`) and one pooled HTTP client that
forwards a request with the caller's identity (`ServiceProxy`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
from fastapi import Response
from pydantic import BaseModel
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common import Actor, identity_headers

from ..auth import Principal
from ..errors import ApiError

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
