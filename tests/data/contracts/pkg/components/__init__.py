"""The layer above core."""
