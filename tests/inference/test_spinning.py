"""The ONNX Runtime threading policy (--ort-spinning / LORAFLOW_ORT_SPINNING): declared, bounded, applied."""

from __future__ import annotations

import time

import pytest

from loraflow.errors import InvalidArgument
from services.inference.__main__ import parse_args
from services.inference.engine import GenerationRequest
from services.inference.model_manager import open_model
from services.inference.runtime import OrtRuntime
from services.inference.sampling import SamplingParams
from services.inference.spinning import (
    CONTENDED_ABOVE,
    QUIET_BELOW,
    SPINNING_ENV,
    HostContention,
    OthersCpu,
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


def _scripted_host(*, cores: int, sample_s: float):
    """A HostContention over a scripted clock and others' CPU: (host, now, readings, the times it read)."""
    now, readings, reads = [0.0], [0.0], []

    def others():
        reads.append(now[0])
        return readings[0]

    return (HostContention(own_threads=2, cores=cores, sample_s=sample_s, others=others, clock=lambda: now[0]), now,
            readings, reads)


def test_contention_switches_with_hysteresis_and_samples_at_most_every_interval():
    # 4 cores, 2 of them ours: other processes may run 2 threads before they contend with ours.
    host, now, readings, reads = _scripted_host(cores=4, sample_s=1.0)
    assert host.free_cores == 2 and host.check() is False
    readings[0] = 2  # as many as the free cores: no contention
    now[0] = 1.0
    assert host.check() is False
    readings[0] = 8
    assert host.check() is False and reads == [0.0, 1.0]  # not sampled again within the interval
    for t in (2.0, 3.0, 4.0):  # smoothed: one sample does not switch, a few do
        now[0] = t
        host.check()
    assert host.contended is True
    readings[0] = 2 + (CONTENDED_ABOVE + QUIET_BELOW) / 2  # between the thresholds: stays contended
    for t in range(5, 30):
        now[0] = float(t)
        assert host.check() is True
    readings[0] = 0
    for t in range(30, 40):
        now[0] = float(t)
        host.check()
    assert host.contended is False
    readings[0] = None  # no reading (no /proc): the last decision stands
    now[0] = 40.0
    assert host.check() is False


def _proc_stat(cpu0: tuple[int, ...], cpu1: tuple[int, ...]) -> str:
    total = tuple(a + b for a, b in zip(cpu0, cpu1, strict=True))
    return "".join(f"{name} {' '.join(map(str, v))} 0 0\n" for name, v in (("cpu", total), ("cpu0", cpu0),
                                                                            ("cpu1", cpu1))) + "intr 1 2 3\n"


def test_others_cpu_counts_other_processes_busy_time_on_our_cores(tmp_path):
    now = [0.0]
    (tmp_path / "self").mkdir()
    # user nice system idle iowait irq softirq steal; 100 ticks per second.
    (tmp_path / "stat").write_text(_proc_stat((100, 0, 0, 900, 0, 0, 0, 0), (50, 0, 0, 950, 0, 0, 0, 0)))
    (tmp_path / "self" / "stat").write_text("7 (python (x) y) R 1 7 7 0 -1 0 0 0 0 0 60 20 0 0\n")
    sampler = OthersCpu(tmp_path, cpus={0, 1}, clock=lambda: now[0])
    sampler.ticks_per_s = 100
    assert sampler() is None  # no window yet
    # One second later: cpu0 +100 busy ticks (user 60, system 20, irq 10, steal 10), cpu1 +30 user, +70 idle and
    # +50 iowait that are not busy; this process used 40 + 10 of them: others used 80 ticks = 0.8 of a core.
    now[0] = 1.0
    (tmp_path / "stat").write_text(_proc_stat((160, 0, 20, 900, 0, 10, 0, 10), (80, 0, 0, 1020, 50, 0, 0, 0)))
    (tmp_path / "self" / "stat").write_text("7 (python (x) y) R 1 7 7 0 -1 0 0 0 0 0 100 30 0 0\n")
    assert sampler() == pytest.approx(0.8)
    # Only the CPUs this process may run on count: another core's work does not contend with ours.
    only_cpu1 = OthersCpu(tmp_path, cpus={1}, clock=lambda: now[0])
    only_cpu1.ticks_per_s = 100
    only_cpu1()
    now[0] = 1.5
    (tmp_path / "stat").write_text(_proc_stat((260, 0, 20, 900, 0, 10, 0, 10), (80, 0, 0, 1070, 50, 0, 0, 0)))
    assert only_cpu1() == 0.0
    (tmp_path / "stat").write_text("garbage")
    assert sampler() is None
    real = OthersCpu()
    real()
    time.sleep(0.05)
    assert isinstance(real(), float)  # this host's /proc


def test_auto_moves_steps_to_a_sleeping_session_while_the_host_is_contended(tiny_artifact, tiny_tokenizer):
    artifact_dir, manifest = tiny_artifact
    prompts = [tiny_tokenizer.encode(p) for p in PROMPTS]

    def run(model) -> list[list[int]]:
        handles = [model.engine.submit(GenerationRequest(tuple(p), a, SamplingParams(max_new_tokens=8)))
                   for p, a in zip(prompts, ["", "alpha", "beta", "gamma"], strict=True)]
        return [list(h.result().token_ids) for h in handles]

    reference = open_model(artifact_dir, num_threads=2, model_id="spin-ref", manifest=manifest, spinning="off")
    try:
        expected = run(reference)
    finally:
        reference.close()
    model = open_model(artifact_dir, num_threads=2, model_id="spin-auto", manifest=manifest, spinning="auto")
    runtime = model.runtime
    try:
        assert isinstance(runtime.contention, HostContention)  # auto watches the host ...
        # ... which, for the test, is quiet first (the real one may be busy).
        runtime.contention = HostContention(own_threads=2, cores=2, sample_s=0.0, others=lambda: 0)
        quiet_bytes = runtime.memory_bytes()
        assert run(model) == expected and runtime.steps_by_spinning["sleeping"] == 0
        # Other processes want every core: the sleeping session opens beside the steps, then takes them.
        runtime.contention = HostContention(own_threads=2, cores=2, sample_s=0.0, others=lambda: 6)
        deadline = time.monotonic() + 60
        while runtime._sleeping_driver is None:
            assert time.monotonic() < deadline, "the sleeping session did not open"
            run(model)
        assert run(model) == expected and runtime.steps_by_spinning["sleeping"] > 0
        options = runtime._sleeping_driver.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert runtime.memory_bytes() > quiet_bytes  # its packed weights are counted
        # Quiet again: back to the spinning session, same tokens.
        runtime.contention = HostContention(own_threads=2, cores=2, sample_s=0.0, others=lambda: 0)
        spinning_steps = runtime.steps_by_spinning["spinning"]
        assert run(model) == expected and runtime.steps_by_spinning["spinning"] > spinning_steps
    finally:
        model.close()

    # Over the memory budget the sleeping session is never opened: the steps spin inside calls only.
    asked: list[int] = []
    tight = open_model(artifact_dir, num_threads=2, model_id="spin-tight", manifest=manifest, spinning="auto",
                       may_grow=lambda nbytes: asked.append(nbytes) or False)
    try:
        tight.runtime.contention = HostContention(own_threads=2, cores=2, sample_s=0.0, others=lambda: 6)
        assert run(tight) == expected and run(tight) == expected
        # Asked at the open (packing on every thread: refused, so one thread packed) and once for the sleeping
        # session, each time with the weights' size.
        assert len(asked) == 2 and asked[0] == asked[1] > 0 and not tight.runtime.parallel_prepack
        assert tight.runtime._sleeping_driver is None and tight.runtime.contention is None
        assert tight.runtime.steps_by_spinning["sleeping"] == 0
    finally:
        tight.close()

    off = OrtRuntime(artifact_dir, manifest, num_threads=1, spinning="off")
    try:
        assert off.contention is None  # only auto watches the host
    finally:
        off.close()


@pytest.mark.parametrize("room", [True, False])
def test_weights_are_packed_in_parallel_only_where_the_budget_has_room_for_their_mapped_pages(tiny_artifact, room):
    artifact_dir, manifest = tiny_artifact
    asked: list[int] = []

    def may_grow(nbytes: int) -> bool:
        asked.append(nbytes)
        return room

    runtime = OrtRuntime(artifact_dir, manifest, num_threads=2, spinning="on", may_grow=may_grow)
    try:
        options = runtime.session.get_session_options()
        assert options.get_session_config_entry("session.prepack.enable_parallel") == ("1" if room else "0")
        assert runtime.parallel_prepack is room
        data = sum(f.size for f in manifest.files if f.path.endswith(".data"))
        assert asked and asked[0] >= data > 0  # asked for the mapped weights, before the session opened
    finally:
        runtime.close()


@pytest.mark.parametrize("policy,allow,stop", [("on", "1", ""), ("off", "0", ""), ("auto", "1", "1")])
def test_each_policy_opens_its_session_options(tiny_artifact, policy, allow, stop):
    artifact_dir, manifest = tiny_artifact
    runtime = OrtRuntime(artifact_dir, manifest, num_threads=2, spinning=policy)
    try:
        options = runtime.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == allow
        assert options.get_session_config_entry("session.prepack.enable_parallel") == "1"  # no budget: room
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


def test_a_window_spanning_an_idle_spell_restarts_instead_of_counting():
    # What others did while no step ran (a peer loading a model, a finished batch job) is not contention now.
    host, now, readings, reads = _scripted_host(cores=2, sample_s=0.5)
    assert host.check() is False
    host.step_ended()
    readings[0] = 2.0  # both cores busy elsewhere ... while this process idles
    now[0] = 30.0
    assert host.check() is False and reads == [0.0, 30.0]  # the window restarted at 30 s
    readings[0] = 0.0  # the peer is done: the next window is quiet
    for t in (30.5, 31.0, 31.5, 32.0):
        now[0] = t
        assert host.check() is False
        host.step_ended()
    readings[0] = 2.0  # contention while steps run is counted as before
    for t in (32.5, 33.0, 33.5, 34.0):
        now[0] = t
        host.check()
        host.step_ended()
    assert host.contended is True
    readings[0] = 0.0
    host.step_ended()
    now[0] = 60.0  # an idle spell keeps the last decision until its next window is sampled
    assert host.check() is True
