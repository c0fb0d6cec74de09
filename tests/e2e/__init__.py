"""End-to-end: the whole mesh as real processes."""
