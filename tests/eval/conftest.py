"""Evaluation tests reuse the training tests' tiny chat model (SmolLM2's tokenizer and chat template)."""

from tests.train.conftest import chat_tiny, smollm2_tokenizer  # noqa: F401  (fixtures)
