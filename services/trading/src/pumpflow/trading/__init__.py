"""pumpflow trading service."""
