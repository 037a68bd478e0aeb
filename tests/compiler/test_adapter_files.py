"""Malformed adapter files and configs: every one is InvalidArgument naming the file and the problem,
never an INTERNAL from a parser, and no error carries bytes read from the file."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file

from loraflow.artifact import lora_bank
from loraflow.errors import InvalidArgument

WEIGHTS, CONFIG = lora_bank.WEIGHTS_FILE, lora_bank.CONFIG_FILE
# Planted in files below: must never appear in an error message or its metadata.
SECRET = "AKIAsecret0123456789"


@pytest.fixture
def adapter_dir(adapter_factory, tmp_path):
    dst = tmp_path / "ad"
    shutil.copytree(adapter_factory("llama", "qv4", r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")), dst)
    return dst


def _tensors(adapter_dir) -> dict[str, np.ndarray]:
    return load_file(str(adapter_dir / WEIGHTS))


def _write_raw(path, header: dict, data: bytes, *, header_len: int | None = None) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)


def _valid_header(adapter_dir) -> tuple[dict, bytes]:
    """The adapter's tensors as (header, data) we can then break one field at a time."""
    header, data, offset = {}, b"", 0
    for name, arr in _tensors(adapter_dir).items():
        raw = arr.astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    return header, data


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _break_weights(adapter_dir, case: str) -> None:
    path = adapter_dir / WEIGHTS
    header, data = _valid_header(adapter_dir)
    first = _first(header)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "shorter_than_length":
        path.write_bytes(b"\x01\x02\x03")
    elif case == "header_len_2_40":
        _write_raw(path, header, data, header_len=2**40)
    elif case == "header_len_past_end":
        _write_raw(path, header, data, header_len=len(json.dumps(header)) + len(data) + 1)
    elif case == "header_not_utf8":
        blob = b'{"' + SECRET.encode() + b'\xff\xfe": 1}'
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    elif case == "header_not_json":
        blob = SECRET.encode()
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    elif case == "header_is_list":
        blob = json.dumps([SECRET]).encode()
        path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    elif case == "offsets_out_of_range":
        header[first]["data_offsets"] = [len(data), len(data) + 16]
        _write_raw(path, header, data)
    elif case == "offsets_disagree_with_shape":
        begin, end = header[first]["data_offsets"]
        header[first]["data_offsets"] = [begin, end - 4]
        _write_raw(path, header, data)
    elif case == "overlapping_tensors":
        names = list(header)
        header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
        _write_raw(path, header, data)
    elif case == "unknown_dtype":
        header[first]["dtype"] = SECRET
        _write_raw(path, header, data)
    elif case == "integer_dtype":
        header[first]["dtype"] = "I32"
        _write_raw(path, header, data)
    elif case == "negative_shape":
        header[first]["shape"] = [-1, 16]
        _write_raw(path, header, data)
    elif case == "shape_not_ints":
        header[first]["shape"] = [SECRET]
        _write_raw(path, header, data)
    elif case == "offsets_not_pair":
        header[first]["data_offsets"] = [0]
        _write_raw(path, header, data)
    elif case == "metadata_not_strings":
        header["__metadata__"] = {"format": 3}
        _write_raw(path, header, data)
    elif case == "nan_weights":
        arr = np.frombuffer(data, "<f4").copy()
        arr[5] = np.nan
        _write_raw(path, header, arr.tobytes())
    elif case == "inf_weights":
        arr = np.frombuffer(data, "<f4").copy()
        arr[-1] = np.inf
        _write_raw(path, header, arr.tobytes())
    elif case == "weights_is_directory":
        path.unlink()
        path.mkdir()
    elif case == "weights_is_fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        raise AssertionError(case)


WEIGHT_CASES = ["truncated", "shorter_than_length", "header_len_2_40", "header_len_past_end", "header_not_utf8",
                "header_not_json", "header_is_list", "offsets_out_of_range", "offsets_disagree_with_shape",
                "overlapping_tensors", "unknown_dtype", "integer_dtype", "negative_shape", "shape_not_ints",
                "offsets_not_pair", "metadata_not_strings", "nan_weights", "inf_weights", "weights_is_directory",
                "weights_is_fifo"]


def _assert_clean(err: InvalidArgument, adapter_dir) -> None:
    text = str(err) + repr(err.metadata)
    assert SECRET not in text
    assert "\ufffd" not in text


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_malformed_weights_file_is_invalid_argument_naming_the_file(adapter_dir, case):
    _break_weights(adapter_dir, case)
    with pytest.raises(InvalidArgument) as err:
        lora_bank.read_adapter("bad", adapter_dir)
    assert WEIGHTS in str(err.value), str(err.value)
    assert err.value.field.startswith("weights") or err.value.field == "adapters"
    _assert_clean(err.value, adapter_dir)


def test_the_reported_problems_are_specific(adapter_dir):
    expected = {"header_len_2_40": "header longer than the file", "offsets_out_of_range": "outside",
                "offsets_disagree_with_shape": "needs", "overlapping_tensors": "overlap",
                "unknown_dtype": "unknown dtype", "integer_dtype": "I32", "nan_weights": "NaN",
                "header_not_utf8": "not UTF-8", "header_is_list": "JSON object"}
    pristine = adapter_dir.parent / "pristine"
    shutil.copytree(adapter_dir, pristine)
    for case, words in expected.items():
        shutil.copy(pristine / WEIGHTS, adapter_dir / WEIGHTS)
        _break_weights(adapter_dir, case)
        with pytest.raises(InvalidArgument) as err:
            lora_bank.read_adapter("bad", adapter_dir)
        assert words in str(err.value), (case, str(err.value))


@pytest.mark.parametrize("case,content", [
    ("not_utf8", b'{"r": 4, "x": "' + SECRET.encode() + b'\xff"}'),
    ("json_list", json.dumps([SECRET]).encode()),
    ("not_json", SECRET.encode()),
    ("json_string", json.dumps(SECRET).encode()),
    ("too_large", b'{"pad": "' + b"x" * (1024 * 1024) + b'"}'),
    ("nan_literal", b'{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}'),
    ("deep_nesting", b"[" * 100_000 + b"]" * 100_000),
])
def test_malformed_config_is_invalid_argument_naming_the_file(adapter_dir, case, content):
    (adapter_dir / CONFIG).write_bytes(content)
    with pytest.raises(InvalidArgument) as err:
        lora_bank.read_adapter("bad", adapter_dir)
    assert CONFIG in str(err.value) and err.value.field == "adapter_config", str(err.value)
    _assert_clean(err.value, adapter_dir)


def _edit_config(path, **changes):
    cfg = json.loads((path / CONFIG).read_text())
    cfg.update(changes)
    (path / CONFIG).write_text(json.dumps(cfg))


@pytest.mark.parametrize("field,changes,shown", [
    ("lora_alpha", {"lora_alpha": float("nan")}, "nan"),
    ("lora_alpha", {"lora_alpha": float("inf")}, "inf"),
    ("lora_alpha", {"lora_alpha": -8}, "-8"),
    ("lora_alpha", {"lora_alpha": True}, "True"),
    ("r", {"r": -4}, "-4"),
    ("r", {"r": True}, "True"),
    ("r", {"r": 4.5}, "4.5"),
    ("r", {"r": 8}, "8"),  # the weights have rank 4: scaling by alpha/8 would be silently wrong
    ("rank_pattern", {"rank_pattern": {"q_proj": 2}}, "2"),
    ("rank_pattern['q_proj']", {"rank_pattern": {"q_proj": float("nan")}}, "nan"),
    ("alpha_pattern['v_proj']", {"alpha_pattern": {"v_proj": float("inf")}}, "inf"),
    ("alpha_pattern", {"alpha_pattern": {"(a+)+$": 3}}, "(a+)+$"),
    ("alpha_pattern", {"alpha_pattern": [1, 2]}, "list"),
    ("rank_pattern", {"rank_pattern": 5}, "int"),
])
def test_non_finite_or_inconsistent_config_values_name_field_and_value(adapter_dir, field, changes, shown):
    # json.dumps writes NaN/Infinity literals, which the reader refuses too; write them as huge numbers
    # instead so the value checks (not the parser) are what is tested.
    text = json.dumps({**json.loads((adapter_dir / CONFIG).read_text()), **changes})
    text = text.replace("-Infinity", "-1e400").replace("Infinity", "1e400")
    if "NaN" in text:
        (adapter_dir / CONFIG).write_text(text)
        with pytest.raises(InvalidArgument) as err:
            lora_bank.read_adapter("bad", adapter_dir)
        assert err.value.field == "adapter_config" and "not valid JSON" in str(err.value)
        return
    (adapter_dir / CONFIG).write_text(text)
    with pytest.raises(InvalidArgument) as err:
        lora_bank.read_adapter("bad", adapter_dir)
    assert err.value.field == field, str(err.value)
    assert shown in str(err.value) and "'bad'" in str(err.value)


def test_full_module_paths_in_target_modules_are_read_by_leaf_name(adapter_dir):
    _edit_config(adapter_dir, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"])
    assert lora_bank.read_adapter("ok", adapter_dir).target_modules == ("q_proj", "v_proj")
    _edit_config(adapter_dir, target_modules=["model.lm_head"])
    with pytest.raises(InvalidArgument, match="target_modules"):
        lora_bank.read_adapter("bad", adapter_dir)


def test_a_matching_rank_pattern_is_accepted(adapter_dir):
    _edit_config(adapter_dir, r=8, rank_pattern={"q_proj": 4, "v_proj": 4})
    ad = lora_bank.read_adapter("ok", adapter_dir)
    assert ad.scaling(0, "q_proj") == pytest.approx(8 / 4)


def test_header_over_the_size_limit_is_refused(adapter_dir, monkeypatch):
    from loraflow.artifact import adapter_files

    monkeypatch.setattr(adapter_files, "MAX_HEADER_BYTES", 64)  # the real adapter's header is larger
    with pytest.raises(InvalidArgument, match="header longer than the 64 bytes allowed"):
        lora_bank.read_adapter("bad", adapter_dir)


def test_a_non_safetensors_file_leaks_none_of_its_bytes(adapter_dir):
    # Any file may be named as an adapter's weights: its first 8 bytes are the "header length".
    secret = b"hunter2!" + b"root:$6$salt$hash:19000:0:99999:7:::\n" * 4
    (adapter_dir / WEIGHTS).write_bytes(secret)
    with pytest.raises(InvalidArgument) as err:
        lora_bank.read_adapter("bad", adapter_dir)
    text = str(err.value) + repr(err.value.metadata)
    assert str(int.from_bytes(secret[:8], "little")) not in text and "hunter2" not in text and "$6$salt" not in text


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "mixed", "gap"])
def test_the_packed_read_equals_the_per_tensor_read_and_names_the_same_bad_tensor(adapter_dir, dtype):
    # One float dtype packed end to end is read in one call (views of one array); mixed dtypes or a gap between
    # tensors take the per-tensor loop. Both give the same float32 values, and a NaN is reported on the same
    # tensor with the same count either way.
    from loraflow.artifact import adapter_files

    path = adapter_dir / WEIGHTS
    tensors = _tensors(adapter_dir)
    names = list(tensors)
    raw = {"F16": (np.float16, "<u2"), "BF16": (np.float32, "<u2"), "F32": (np.float32, "<f4")}
    header, blobs, offset = {}, [], 0
    for i, name in enumerate(names):
        kind = "F16" if dtype == "mixed" and i % 2 else ("F32" if dtype in ("mixed", "gap") else dtype)
        value = tensors[name].astype(raw[kind][0])
        blob = (value.view("<u4") >> 16).astype("<u2").tobytes() if kind == "BF16" else value.tobytes()
        if dtype == "gap" and i == 1:
            blobs.append(b"\xff" * 4)  # bytes no tensor owns (a NaN if read as F32)
            offset += 4
        header[name] = {"dtype": kind, "shape": list(value.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    _write_raw(path, header, b"".join(blobs))
    read = adapter_files.read_float_tensors(path)
    header_again, start, _ = adapter_files.read_header(path)
    each = adapter_files._read_each(path, header_again, start)
    assert packed_read_used(adapter_files, path) == (dtype in ("F16", "BF16", "F32"))
    for name in names:
        assert read[name].dtype == np.float32 and read[name].shape == tensors[name].shape
        np.testing.assert_array_equal(read[name], each[name])
    # The third tensor gets two NaNs: the same error from both paths.
    info = header[names[2]]
    data = bytearray(path.read_bytes())
    first = 8 + len(json.dumps(header).encode()) + info["data_offsets"][0]
    nan = {"F16": b"\x00\x7e", "BF16": b"\xc0\x7f", "F32": b"\x00\x00\xc0\x7f"}[info["dtype"]]
    data[first:first + 2 * len(nan)] = nan * 2
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidArgument) as err:
        adapter_files.read_float_tensors(path)
    assert err.value.value == names[2] and "holds 2 NaN or infinite values" in str(err.value)


def packed_read_used(adapter_files, path) -> bool:
    header, start, length = adapter_files.read_header(path)
    return adapter_files._read_packed(path, header, start, length) is not None
