"""Shared fixtures. The embedded model is fetched and converted once per cache
($SAP_DIST_CACHE, set by .ci/run) and reused by every test that needs it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    """A transformers directory holding the embedded SmolLM2-135M-Instruct and its tokenizer."""
    from sap_dist.embedded import converted_dir

    return converted_dir()


@pytest.fixture(scope="session")
def smol_tokenizer(embedded_dir):
    """The real SmolLM2 tokenizer (ChatML chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)
