"""``meetmesh submit TYPE --data JSON [--wait]``: submit a task through the gateway, as a client would.

Without ``--wait``: ``POST /api/v1/tasks``, then print the task id and its position. With ``--wait``:
submit over the WebSocket and follow the task live (status, a progress bar from ``progress`` frames,
the streamed ``delta`` text as it arrives, then the result as JSON); the exit code is 0 when the task
completed, 1 otherwise. ``--json`` prints the answer (or, waiting, every frame) as JSON lines.

The token: ``--token``, else ``MEETMESH_TOKEN``, else one minted for ``--user NAME``, a registered
user, as ``meetmesh token --user NAME`` does: looked up in the user service's store, signed with
``MEETMESH_JWT_SECRET`` (or ``MEETMESH_JWT_SECRET_FILE``), else with the development secret
``meetmesh up`` keeps in the data folder (``MEETMESH_DATA_DIR``, default ``./.meetmesh``), so a second
shell in the same folder needs nothing set.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console, Group
from rich.json import JSON
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from shared.bus.queue.message import PRIORITIES

SUBMIT_ID = "submit"


def default_gateway() -> str:
    """``MEETMESH_GATEWAY_URL``, else the local gateway on ``MEETMESH_PORT`` (8000)."""
    port = os.environ.get("MEETMESH_PORT") or 8000
    return os.environ.get("MEETMESH_GATEWAY_URL") or f"http://127.0.0.1:{port}"


def resolve_token(token: str | None, user: str | None) -> str:
    """The bearer token to send (see the module's docstring); exits with a hint when there is none."""
    if token:
        return token
    if not user:
        sys.exit("meetmesh submit: no token: pass --token, set MEETMESH_TOKEN (e.g. the access_token of "
                 "/api/v1/auth/login), or name a registered user with --user NAME to mint one")
    from .user import mint_for_user

    return mint_for_user(user, command="submit")


def task_body(type: str, payload: Any, *, priority: str | None, timeout: float | None,
              meeting: str | None) -> dict[str, Any]:
    """The REST body (``type`` ...); the WebSocket ``submit`` frame says ``task`` instead of ``type``."""
    body: dict[str, Any] = {"type": type, "data": payload}
    if priority is not None:
        body["priority"] = priority
    if timeout is not None:
        body["timeout_s"] = timeout
    if meeting is not None:
        body["meeting_id"] = meeting
    return body


def fail(message: str) -> None:
    """One line on stderr."""
    Console(stderr=True, highlight=False).print(f"meetmesh submit: {message}", style="red", soft_wrap=True)


def _error_text(answer: httpx.Response) -> str:
    try:
        error = answer.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return answer.text[:500] or answer.reason_phrase


async def post(gateway: str, token: str, body: dict[str, Any], *, as_json: bool, console: Console) -> int:
    """``POST /api/v1/tasks``; prints the answer; the exit code."""
    url = gateway.rstrip("/") + "/api/v1/tasks"
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        fail(f"cannot reach the gateway at {gateway}: {exc!r}")
        return 1
    if not answer.is_success:
        fail(f"{answer.status_code} {_error_text(answer)}")
        return 1
    accepted = answer.json()
    if as_json:
        print(json.dumps(accepted), flush=True)
    else:
        position = accepted.get("position")
        where = f" (position {position})" if position is not None else ""
        console.print(f"{accepted['status']} {accepted['task_id']}{where}", highlight=False)
    return 0


class Display:
    """What ``--wait`` shows: status, a progress bar, the streamed text; `render` for rich's Live."""

    def __init__(self, type: str) -> None:
        self.type = type
        self.task_id = "…"
        self.status = "submitting"
        self.text = Text()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn())
        self.bar = self.progress.add_task(self._describe(), total=1.0)

    def _describe(self) -> str:
        return f"{self.type} [bold]{self.status}[/bold]"

    def update(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "accepted":
            self.task_id = str(frame.get("task_id"))
            self.status = str(frame.get("status"))
            if frame.get("position") is not None:
                self.status += f" (position {frame['position']})"
        elif kind == "status":
            self.status = str(frame.get("status"))
        elif kind == "progress":
            if isinstance(frame.get("progress"), int | float):
                self.progress.update(self.bar, completed=float(frame["progress"]))
            if isinstance(frame.get("delta"), str):
                self.text.append(frame["delta"])
        elif kind == "result":
            self.status = str(frame.get("status"))
            if frame.get("status") == "completed":
                self.progress.update(self.bar, completed=1.0)
        self.progress.update(self.bar, description=self._describe())

    def render(self) -> Group:
        parts: list[Any] = [Text(f"task {self.task_id}", style="dim"), self.progress]
        return Group(*parts, self.text) if self.text else Group(*parts)


async def follow(gateway: str, token: str, body: dict[str, Any], *, as_json: bool, console: Console) -> int:
    """Submit over the WebSocket and follow the task to its result; the exit code (0: completed)."""
    import websockets
    from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

    ws_url = gateway.rstrip("/").replace("http", "ws", 1) + "/ws"  # the token in a header, never the URL
    frame_out = {"type": "submit", "id": SUBMIT_ID, "task": body["type"],
                 **{k: v for k, v in body.items() if k != "type"}}
    display = Display(body["type"])
    # Live redraws on a terminal; elsewhere (a pipe, a file) the final state is printed once, at the end
    live = Live(display.render(), console=console, refresh_per_second=12) \
        if console.is_terminal and not as_json else None
    task_id: str | None = None
    final: dict[str, Any] | None = None
    try:
        if live is not None:
            live.start()
        async with websockets.connect(ws_url, subprotocols=["bearer", token],  # type: ignore[list-item]
                                      max_size=8 << 20) as ws:
            await ws.send(json.dumps(frame_out))
            async for raw in ws:
                frame = json.loads(raw)
                if as_json:
                    print(json.dumps(frame), flush=True)
                kind = frame.get("type")
                if kind == "error" and frame.get("id") in (SUBMIT_ID, None) and task_id is None:
                    final = frame
                    break
                if kind == "accepted" and frame.get("id") == SUBMIT_ID:
                    task_id = frame.get("task_id")
                if task_id is None or (kind != "accepted" and frame.get("task_id") != task_id):
                    continue
                display.update(frame)
                if live is not None:
                    live.update(display.render())
                if kind == "result":
                    final = frame
                    break
    except InvalidStatus as exc:
        status = exc.response.status_code
        final = {"type": "error", "code": "unauthorized" if status in (401, 403) else "refused",
                 "message": f"the gateway refused the WebSocket ({status})"}
    except ConnectionClosed as exc:
        code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else (1006, "")
        final = {"type": "error", "code": "unauthorized" if code == 1008 else "unavailable",
                 "message": f"the gateway closed the connection ({code}{': ' + reason if reason else ''})"}
    except (OSError, WebSocketException) as exc:
        final = {"type": "error", "code": "unavailable", "message": f"connection to {ws_url.split('?')[0]} "
                 f"failed: {exc!r}"}
    finally:
        if live is not None:
            live.update(display.render())
            live.stop()
        elif not as_json and task_id is not None:
            console.print(display.render())
    if final is None:
        final = {"type": "error", "code": "unavailable",
                 "message": "the gateway closed the connection before the result"
                            + (f"; see GET /api/v1/tasks/{task_id}" if task_id else "")}
        if as_json:
            print(json.dumps(final), flush=True)
    if final.get("type") == "result":
        if not as_json:
            _print_result(final, console)
        return 0 if final.get("status") == "completed" else 1
    fail(f"{final.get('code')}: {final.get('message')}")
    return 1


def _print_result(frame: dict[str, Any], console: Console) -> None:
    status = frame.get("status")
    style = "bold green" if status == "completed" else "bold red"
    console.print(Text.assemble(("result ", "bold"), (str(status), style), f"  {frame.get('task_id')}"))
    if frame.get("error"):
        error = frame["error"]
        console.print(f"{error.get('code')}: {error.get('message')}", style="red", soft_wrap=True)
    if frame.get("result") is not None:
        console.print(JSON.from_data(frame["result"]))


def submit_cmd(
    type: Annotated[str, typer.Argument(help="Task type, e.g. ai.summarize (its prefix picks the service).")],
    data: Annotated[str, typer.Option(help="Payload as JSON.")] = "null",
    priority: Annotated[str | None, typer.Option(help="critical, high, normal or low.")] = None,
    timeout: Annotated[float | None, typer.Option(
        min=0.001, help="Deadline from submission, seconds (queueing included).")] = None,
    meeting: Annotated[str | None, typer.Option(help="The meeting the task belongs to (meeting_id).")] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Submit over the WebSocket and follow the task live to its result.")] = False,
    gateway: Annotated[str | None, typer.Option(
        help="The gateway's URL (default MEETMESH_GATEWAY_URL, else http://127.0.0.1:$MEETMESH_PORT "
             "or 8000).")] = None,
    token: Annotated[str | None, typer.Option(
        envvar="MEETMESH_TOKEN", show_envvar=True,
        help="Bearer token (default: one minted for --user NAME).")] = None,
    user: Annotated[str | None, typer.Option(
        help="Without a token: a registered user to mint one for (as `meetmesh token --user NAME`).")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON lines: the answer, or with --wait every frame.")] = False,
) -> None:
    """Submit a task through the gateway; with --wait, follow it live (exit code 0 only if it completed)."""
    from .common import run

    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--data") from exc
    if priority is not None and priority not in PRIORITIES:
        raise typer.BadParameter(f"{priority!r}: use one of {', '.join(PRIORITIES)}", param_hint="--priority")
    bearer = resolve_token(token, user)
    url = gateway or default_gateway()
    body = task_body(type, payload, priority=priority, timeout=timeout, meeting=meeting)
    console = Console(highlight=False)
    try:
        if wait:
            code = run(lambda: follow(url, bearer, body, as_json=as_json, console=console))
        else:
            code = run(lambda: post(url, bearer, body, as_json=as_json, console=console))
    except KeyboardInterrupt:
        fail("stopped waiting (the task goes on)")
        code = 130
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``submit`` to the ``meetmesh`` app."""
    app.command("submit")(submit_cmd)


def main(argv: list[str] | None = None) -> Any:
    """``python -m meetmesh.submit TYPE ...``: ``meetmesh submit`` on its own."""
    standalone = typer.Typer(add_completion=False)
    standalone.command()(submit_cmd)
    return standalone(argv)


if __name__ == "__main__":
    main()
