"""pfe.engine."""
