"""Data sources, manifests, shards and loaders."""
