"""services/user (built in a later issue)."""
