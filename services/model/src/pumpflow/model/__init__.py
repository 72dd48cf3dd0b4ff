"""pumpflow model service."""
