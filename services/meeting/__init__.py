"""services/meeting (built in a later issue)."""
