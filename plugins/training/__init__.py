"""Offline scripts that build the model files under ``plugins/models/`` (not used at run time)."""
