"""pumpflow activity service."""
