"""The on-disk layout, in one place."""

FACTORS_FILE = "factors.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1

__all__ = ["FACTORS_FILE", "MANIFEST_FILE", "FORMAT_VERSION"]
