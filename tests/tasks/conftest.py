from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    """SmolLM2's tokenizer with its ChatML template (only the tokenizer files are read)."""
    from deltafleet.models.loading import load_tokenizer

    return load_tokenizer(smollm2_path)
