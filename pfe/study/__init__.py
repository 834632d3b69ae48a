"""pfe.study."""
