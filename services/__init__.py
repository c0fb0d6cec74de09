"""services (built in a later issue)."""
