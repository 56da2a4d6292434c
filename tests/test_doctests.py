"""The worked examples in the library's docstrings are true."""
import doctest
import importlib

import pytest

MODULES = ["sft.packing", "sft.templates", "sft.template_traits", "sft.formats", "sft.config", "sft.tracking",
           "sft.chat", "sft.optim", "sft.selection"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
