"""services/ai (built in a later issue)."""
