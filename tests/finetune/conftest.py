"""Shared fixtures: the offline tiny chat model (built once per session) and its tokenizer."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    from serving.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-chat", model_id="platform/tiny-chat")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)
