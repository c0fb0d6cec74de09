"""Running Debian's ffmpeg and ffprobe: always ``asyncio.create_subprocess_exec`` (an argument list, never
a shell), stdin closed, with a timeout; a failure says ffmpeg's last stderr line.

- `probe`: duration and frame size of an upload (ffprobe), refusing files with no video stream.
- `cover`: one frame as a JPEG, at 1 s (or the first frame of a shorter clip), at most 640 wide.
- `spawn_transcode`: start a transcode in the background, in a session of its own (it outlives the
  worker that started it), writing ``-progress`` key=value lines to a file and stderr to a log;
  `read_progress` and `alive` are how any later stage, in any worker, follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from services.common import Unavailable

COVER_WIDTH = 640
COVER_AT_S = 1.0
TAIL_BYTES = 8192


class FfmpegFailed(Exception):
    """ffmpeg (or ffprobe) failed: ``reason`` is its last stderr line (or what went wrong)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Probe:
    duration_s: float | None
    width: int | None
    height: int | None


@dataclass(frozen=True)
class Progress:
    """What a transcode's ``-progress`` file says: media time written, whether ffmpeg finished (it
    writes ``progress=end`` after the output's trailer), and when the file last changed."""

    out_time_s: float
    ended: bool
    updated_at: float | None


# An absolute path of two components or more (what ffmpeg puts before its errors), not "1/2" or "a/b"
_PATH = re.compile(r"(?<![\w.~/-])/(?:[^\s'\"/:,]+/)+([^\s'\"/:,]*)")


def without_paths(text: str, named: dict[str, str] | None = None) -> str:
    """``text`` with each path in ``named`` (path -> what to call it) replaced by its name, and any
    other absolute path by its last component: errors go to clients, and never carry server paths."""
    for path, name in (named or {}).items():
        text = text.replace(path, name)
    return _PATH.sub(lambda m: m.group(1) or "a file", text)


def last_line(text: str | bytes, named: dict[str, str] | None = None) -> str:
    """The last non-empty line of ffmpeg's stderr, trimmed (its error, in practice), without paths
    (`without_paths`)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return without_paths(lines[-1] if lines else "no error output", named)[:500]


async def run(argv: list[str], timeout: float) -> tuple[int, bytes, bytes]:
    """Run ``argv``: (exit status, stdout, stderr). `FfmpegFailed` on timeout (the process is killed);
    `Unavailable` when the program is missing."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except (FileNotFoundError, PermissionError) as exc:
        raise Unavailable(f"cannot run {Path(argv[0]).name!r} ({exc.strerror}): install Debian's ffmpeg "
                          "package or set MEETMESH_FFMPEG / MEETMESH_FFPROBE") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise FfmpegFailed(f"{Path(argv[0]).name} timed out after {timeout:g} s") from None
    except BaseException:  # cancelled (the task's own timeout, shutdown): leave no process behind
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    return proc.returncode or 0, out, err


async def probe(ffprobe: str, path: Path, timeout: float) -> Probe:
    """Duration and size of the first video stream; `FfmpegFailed` when ffprobe cannot read the file
    or it has no video stream."""
    status, out, err = await run(
        [ffprobe, "-v", "error", "-select_streams", "v:0", "-show_entries",
         "stream=width,height:format=duration", "-of", "json", str(path)], timeout)
    if status != 0:
        raise FfmpegFailed(last_line(err, {str(path): "the video"}))
    try:
        info = json.loads(out or b"{}")
    except ValueError:
        raise FfmpegFailed("ffprobe answered something other than JSON") from None
    streams = info.get("streams") or []
    if not streams:
        raise FfmpegFailed("it has no video stream")
    duration = _number(info.get("format", {}).get("duration"))
    return Probe(duration, _int(streams[0].get("width")), _int(streams[0].get("height")))


async def cover(ffmpeg: str, source: Path, target: Path, duration_s: float | None, timeout: float) -> None:
    """Write a JPEG of one frame of ``source`` to ``target`` (atomically: a ``.part`` file renamed).

    At `COVER_AT_S`, or at the start when the clip is shorter (or when seeking there gives nothing).
    `FfmpegFailed` with ffmpeg's last stderr line.
    """
    part = target.with_name(f"{target.name}.{uuid.uuid4().hex[:12]}.part")  # covers of one item may race
    starts = [0.0] if duration_s is not None and duration_s <= COVER_AT_S else [COVER_AT_S, 0.0]
    try:
        for at in starts:
            status, _, err = await run(
                [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-ss", f"{at:g}",
                 "-i", str(source), "-map", "0:v:0", "-frames:v", "1", "-vf",
                 f"scale='min({COVER_WIDTH},iw)':-2", "-q:v", "3", "-f", "image2", "-update", "1",
                 "-c:v", "mjpeg", str(part)], timeout)
            if status != 0:
                raise FfmpegFailed(last_line(err, {str(source): "the video", str(part): "the cover"}))
            if await asyncio.to_thread(_nonempty, part):
                await asyncio.to_thread(os.replace, part, target)
                return
        raise FfmpegFailed("ffmpeg wrote no frame: the video has none that decodes")
    finally:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)


def transcode_argv(ffmpeg: str, source: Path, part: Path, progress: Path, fmt: str,
                   height: int | None) -> list[str]:
    """ffmpeg's arguments for a transcode to ``fmt`` (mp4: H.264 + AAC; webm: VP9 + Opus)."""
    argv = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(source),
            "-map", "0:v:0", "-map", "0:a:0?"]
    if height is not None:
        argv += ["-vf", f"scale=-2:{height}"]
    if fmt == "webm":
        argv += ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1",
                 "-b:v", "0", "-crf", "35", "-c:a", "libopus", "-f", "webm"]
    else:
        argv += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
                 "-c:a", "aac", "-movflags", "+faststart", "-f", "mp4"]
    return [*argv, "-progress", str(progress), "-stats_period", "0.5", str(part)]


async def spawn_transcode(argv: list[str], log: Path) -> asyncio.subprocess.Process:
    """Start ``argv`` in the background (its own session: a signal to the service's process group does
    not stop it), stderr appended to ``log``. `Unavailable` when ffmpeg is missing."""
    handle = await asyncio.to_thread(open, log, "ab")
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=handle,
            start_new_session=True)
    except (FileNotFoundError, PermissionError) as exc:
        raise Unavailable(f"cannot run {Path(argv[0]).name!r} ({exc.strerror}): install Debian's ffmpeg "
                          "package or set MEETMESH_FFMPEG") from exc
    finally:
        handle.close()


def read_progress(path: Path) -> Progress:
    """The last report in a ``-progress`` file (nothing yet: zero, not ended)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace")
            updated = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return Progress(0.0, False, None)
    out_time, ended = 0.0, False
    for line in tail.splitlines():
        key, _, value = line.partition("=")
        if key == "out_time_us":
            number = _number(value)
            if number is not None and number >= 0:
                out_time = number / 1e6
        elif key == "progress":
            ended = value.strip() == "end"
    return Progress(out_time, ended, updated)


def log_tail(path: Path) -> str:
    """The last line ffmpeg wrote to a transcode's log."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            return last_line(f.read())
    except FileNotFoundError:
        return "no error output"


def process_start(pid: int) -> str | None:
    """The start time (clock ticks since boot) of a live process ``pid``, or None when there is no such
    process or it has exited (a zombie). With the pid, it names one process: pids are reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def alive(pid: int | None, start: str | None) -> bool:
    """Whether process ``pid`` that started at ``start`` (see `process_start`) still runs here."""
    return pid is not None and start is not None and process_start(pid) == start


def stale(progress: Progress, since: float, seconds: float) -> bool:
    """No word from a transcode (its progress file unchanged) for ``seconds``: how a worker on another
    host, which cannot see the process, decides it is gone."""
    last = progress.updated_at or since
    return time.time() - last > seconds


def _nonempty(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number == number and number not in (float("inf"), float("-inf")) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
