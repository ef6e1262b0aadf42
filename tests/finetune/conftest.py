"""Shared fixtures: the offline tiny chat model (built once per session) and its tokenizer."""

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)
