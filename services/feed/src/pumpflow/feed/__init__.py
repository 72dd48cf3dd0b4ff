"""pumpflow feed service."""
