"""Fault scenarios for MeetMesh (``meetmesh chaos ...``): an app above the bus, never imported by it."""
