"""The media service: uploads into a local object store, covers and transcodes with ffmpeg, and the
state of a meeting's recordings and streams. ``python -m services.media``; see README.md here."""
