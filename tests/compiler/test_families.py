"""The compiler's model-family registry: one module per family, the library's list equal to it."""

from __future__ import annotations

import pytest

from loraflow.errors import InvalidArgument
from loraflow.model_families import SUPPORTED_MODEL_FAMILIES, check_model_family
from services.compiler.families import FAMILIES, family
from services.compiler.modeling.config import SUPPORTED_ARCHITECTURES


def test_the_library_list_is_the_compiler_registry():
    """The trainer checks against loraflow.model_families without importing the compiler: the two lists
    must be the same families in the same order."""
    assert tuple(FAMILIES) == SUPPORTED_MODEL_FAMILIES == SUPPORTED_ARCHITECTURES
    for name, spec in FAMILIES.items():
        assert spec.model_type == name and family(name) is spec


@pytest.mark.parametrize("model_type", ["gpt2", "", None, 7, "x" * 100])
def test_an_unknown_family_is_refused_naming_it_and_the_list(model_type):
    with pytest.raises(InvalidArgument) as err:
        check_model_family(model_type, field="base_model")
    assert err.value.field == "base_model"
    assert str(list(SUPPORTED_MODEL_FAMILIES)) in str(err.value)
    if isinstance(model_type, str) and len(model_type) <= 64:
        assert repr(model_type) in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        family(model_type)
    assert err.value.field == "base_model.model_type"
