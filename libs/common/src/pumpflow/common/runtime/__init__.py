"""Service runtime: settings, logging, HTTP health and metrics, lifecycle."""
