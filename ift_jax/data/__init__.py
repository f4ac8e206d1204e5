"""Data: instruction templates, local record files and deterministic splits."""
