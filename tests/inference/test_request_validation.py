"""The sampling fields are declared once (loraflow.options.sampling_params) and both front doors derive from them."""

from __future__ import annotations

import dataclasses

import pytest

from loraflow.errors import InvalidArgument
from loraflow.options.sampling_params import SAMPLING_FIELDS, SamplingParams
from loraflow.v1 import inference_pb2 as pb
from services.inference.openai_api.errors import param_name
from services.inference.openai_api.schemas import CompletionRequest, parse_completion
from services.inference.request_validation import sampling_from_http, sampling_from_proto


def test_one_declaration_matches_the_proto_the_dataclass_and_the_http_models():
    names = [f.name for f in SAMPLING_FIELDS]
    assert names == [f.name for f in pb.SamplingParams.DESCRIPTOR.fields]
    assert names == [f.name for f in dataclasses.fields(SamplingParams)]
    http = CompletionRequest.model_fields
    for f in SAMPLING_FIELDS:
        assert f.help and f.http_name in http, f.name
        assert http[f.http_name].default == f.http_default and http[f.http_name].description == f.help
        assert param_name(f"sampling.{f.name}") == f.http_name
        assert getattr(SamplingParams(), f.name) == f.default
        assert f.check(f.default) is None, f.name


def test_proto_zeros_mean_the_declared_defaults():
    assert sampling_from_proto(pb.SamplingParams()) == SamplingParams()
    got = sampling_from_proto(pb.SamplingParams(max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.9, seed=7,
                                                stop=["x"], repetition_penalty=1.1, ignore_eos=True))
    assert got == SamplingParams(max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.9, seed=7, stop=("x",),
                                 repetition_penalty=1.1, ignore_eos=True)


def test_http_takes_the_openai_names_and_defaults():
    request = parse_completion({"model": "m", "prompt": "hi", "stop": "end", "seed": 3})
    got = sampling_from_http(request, max_new_tokens=9)
    assert got == SamplingParams(max_new_tokens=9, temperature=1.0, top_p=1.0, seed=3, stop=("end",))


@pytest.mark.parametrize("name,value", [("temperature", 200.0), ("top_p", 1.5), ("top_k", -1), ("seed", -1),
                                        ("repetition_penalty", 1e6), ("stop", [""])])
def test_both_front_doors_refuse_a_value_alike(name, value):
    with pytest.raises(InvalidArgument) as by_grpc:
        sampling_from_proto(pb.SamplingParams(**{name: value}), "requests[1].sampling")
    field = next(f for f in SAMPLING_FIELDS if f.name == name)
    with pytest.raises(InvalidArgument) as by_http:
        sampling_from_http(parse_completion({"model": "m", "prompt": "hi", field.http_name: value}), 4)
    assert by_grpc.value.field == f"requests[1].sampling.{name}"
    assert by_http.value.field == f"sampling.{name}" and param_name(by_http.value.field) == field.http_name
    assert by_grpc.value.message.replace("requests[1].", "") == by_http.value.message
