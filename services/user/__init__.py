"""The user service: register and log in (argon2id hashes), JWTs with roles, profiles; REST through
the gateway (``/api/v1/auth/...``, ``/api/v1/users/...``) and the ``user.profile.update`` task."""
