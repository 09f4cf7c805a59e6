"""Backbone registry, the extraction loop and the feature-file format."""
