-- Hand ready messages to idle workers (after resume, or whenever an operator asks).
-- KEYS, ARGV[1..6]: the queue layout (see _lib.lua)
-- Returns: how many messages were handed over
return serve_idle(now_ms())
