"""Artifact formats: safe safetensors I/O, manifests, base-model fingerprints."""
