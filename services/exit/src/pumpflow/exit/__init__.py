"""pumpflow exit service."""
