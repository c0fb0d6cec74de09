"""gateway (built in a later issue)."""
