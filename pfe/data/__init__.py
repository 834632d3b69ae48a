"""pfe.data."""
