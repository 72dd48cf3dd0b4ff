"""pumpflow features service."""
