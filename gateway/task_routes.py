"""Which queue serves each task type: the services' task routes, which the gateway gives its dispatcher
(`shared.bus.dispatch.dispatcher.Dispatcher`, ``routes=``). A type missing here is refused as
``unknown_task``."""

from __future__ import annotations

TASK_ROUTES: dict[str, str] = {
    **{t: "ai" for t in ("ai.summarize", "ai.chat", "ai.translate", "ai.action_items",
                         "ai.speech_recognition", "ai.emotion_detection")},
    **{t: "media" for t in ("media.cover", "media.transcode", "media.recording.start",
                            "media.recording.stop", "media.stream.start", "media.stream.stop")},
    **{t: "meeting" for t in ("meeting.create", "meeting.join", "meeting.leave", "meeting.end",
                              "meeting.mute", "meeting.unmute", "meeting.kick")},
    "user.profile.update": "user",
}
