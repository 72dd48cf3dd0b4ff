"""pumpflow simulator service."""
