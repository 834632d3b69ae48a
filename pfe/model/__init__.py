"""pfe.model."""
