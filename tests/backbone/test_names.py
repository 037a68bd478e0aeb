import pytest

from loraflow.errors import InvalidArgument
from loraflow.options.names import MAX_NAME_LEN, is_valid_name, validate_name


@pytest.mark.parametrize("name", ["a", "my-adapter_v1.2", "A" * MAX_NAME_LEN, "job-0123abcd", "x.y"])
def test_valid_names_pass(name):
    assert validate_name("adapter_name", name) == name


@pytest.mark.parametrize("name", [
    "", "../etc", "..", "a/../b", "a/b", ".hidden", "a..b", "a b", "a\x00b", "ä", "A" * (MAX_NAME_LEN + 1),
    "a\\b", "a\nb",
])
def test_invalid_names_name_field_and_value(name):
    with pytest.raises(InvalidArgument) as info:
        validate_name("adapter_name", name)
    err = info.value
    assert err.field == "adapter_name"
    assert err.metadata["field"] == "adapter_name"
    assert err.code == "INVALID_ARGUMENT"
    assert "adapter_name" in str(err)
    assert not is_valid_name(name)


def test_non_string_and_oversized_value_is_truncated_in_metadata():
    with pytest.raises(InvalidArgument):
        validate_name("job_id", 5)
    with pytest.raises(InvalidArgument) as info:
        validate_name("job_id", "x" * 100_000)
    assert len(info.value.metadata["value"]) < 300
