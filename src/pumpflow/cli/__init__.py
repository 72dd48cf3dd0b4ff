"""pumpflow command line and embedded launcher."""
