"""services/media (built in a later issue)."""
