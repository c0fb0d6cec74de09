"""The meeting service: meetings with a host and participants (create, join, leave, end, mute,
unmute, kick) and their chat; REST through the gateway (``/api/v1/meetings...``) and the
``meeting.*`` tasks; live updates on ``meeting.<id>``. Kept light: the gateway imports its schemas
and participant keys."""
