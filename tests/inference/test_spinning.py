"""The ONNX Runtime threading policy (--ort-spinning / LORAFLOW_ORT_SPINNING): declared, bounded, applied."""

from __future__ import annotations

import pytest

from loraflow.errors import InvalidArgument
from services.inference.__main__ import parse_args
from services.inference.engine import GenerationRequest
from services.inference.model_manager import open_model
from services.inference.runtime import OrtRuntime
from services.inference.sampling import SamplingParams
from services.inference.spinning import (
    PRESSURE_HIGH,
    PRESSURE_LOW,
    SPINNING_ENV,
    HostContention,
    check_spinning,
    spinning_from_env,
)
from tests.inference.conftest import PROMPTS


def test_flag_wins_over_the_environment_which_wins_over_the_default(monkeypatch):
    monkeypatch.delenv(SPINNING_ENV, raising=False)
    assert parse_args([]).ort_spinning == "auto"
    monkeypatch.setenv(SPINNING_ENV, "off")
    assert parse_args([]).ort_spinning == "off"
    assert parse_args(["--ort-spinning", "on"]).ort_spinning == "on"


def test_a_bad_policy_is_refused_naming_where_it_came_from(monkeypatch, capsys):
    monkeypatch.setenv(SPINNING_ENV, "sometimes")
    with pytest.raises(SystemExit) as exit_info:
        parse_args([])
    assert exit_info.value.code == 2 and SPINNING_ENV in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--ort-spinning", "yes"])
    assert "argument --ort-spinning" in capsys.readouterr().err
    with pytest.raises(InvalidArgument) as err:
        check_spinning("fast")
    assert err.value.field == "ort_spinning" and "fast" in str(err.value)
    with pytest.raises(InvalidArgument):
        spinning_from_env({SPINNING_ENV: "1"})


def test_contention_switches_with_hysteresis_and_samples_at_most_every_interval():
    now, readings, reads = [0.0], [5.0], []

    def pressure():
        reads.append(now[0])
        return readings[0]

    host = HostContention(own_threads=2, cores=2, sample_s=1.0, pressure=pressure, clock=lambda: now[0])
    assert host.check() is False
    readings[0] = PRESSURE_HIGH + 1
    assert host.check() is False and reads == [0.0]  # not sampled again within the interval
    now[0] = 1.0
    assert host.check() is True
    readings[0] = (PRESSURE_LOW + PRESSURE_HIGH) / 2  # between the thresholds: stays contended
    now[0] = 2.0
    assert host.check() is True
    readings[0] = PRESSURE_LOW - 1
    now[0] = 3.0
    assert host.check() is False
    readings[0] = None  # no reading (no PSI, no /proc): the last decision stands
    now[0] = 4.0
    assert host.check() is False and reads == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("policy,allow,stop", [("on", "1", ""), ("off", "0", ""), ("auto", "1", "1")])
def test_each_policy_opens_its_session_options(tiny_artifact, policy, allow, stop):
    artifact_dir, manifest = tiny_artifact
    runtime = OrtRuntime(artifact_dir, manifest, num_threads=2, spinning=policy)
    try:
        options = runtime.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == allow
        if stop:
            assert options.get_session_config_entry("session.force_spinning_stop") == stop
        assert runtime.spinning == policy
    finally:
        runtime.close()
    with pytest.raises(InvalidArgument) as err:
        OrtRuntime(artifact_dir, manifest, spinning="always")
    assert err.value.field == "ort_spinning"


def test_every_policy_generates_the_same_tokens(tiny_artifact, tiny_tokenizer):
    artifact_dir, manifest = tiny_artifact
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS]
    outputs = {}
    for policy in ("on", "off", "auto"):
        model = open_model(artifact_dir, num_threads=2, model_id=f"spin-{policy}", manifest=manifest, spinning=policy)
        try:
            handles = [model.engine.submit(GenerationRequest(tuple(p), a, SamplingParams(max_new_tokens=8)))
                       for p, a in zip(prompts, ["", "alpha", "beta", "gamma"], strict=True)]
            outputs[policy] = [list(h.result().token_ids) for h in handles]
        finally:
            model.close()
    assert outputs["on"] == outputs["off"] == outputs["auto"]
