"""bench/loadgen.py's own arithmetic: the traffic split inference-perf accepts (its splits must sum to exactly
1.0 as floats) and the per-request summary (server token counts, chunk-gap ITL, per popularity class)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def loadgen():
    spec = importlib.util.spec_from_file_location("bench_loadgen", ROOT / "bench" / "loadgen.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_zipf_splits_sum_to_exactly_one_in_popularity_order(loadgen):
    names = [f"a{i:04d}" for i in range(1000)]
    splits = loadgen.zipf_splits(names, 1.1)
    values = [s["split"] for s in splits]
    assert [s["name"] for s in splits] == names
    assert sum(values) == 1.0  # float equality: what inference-perf's config validation checks
    assert all(a >= b > 0 for a, b in zip(values, values[1:], strict=False))
    assert values[0] / values[9] == pytest.approx(10 ** 1.1, rel=1e-3)  # Zipf s=1.1 between ranks 1 and 10


def _entry(start, chunks, tokens, adapter=None):
    return {"start_time": start, "end_time": chunks[-1], "error": None,
            "info": {"lora_adapter": adapter, "response_metrics": {
                "server_usage": {"completion_tokens": tokens}, "output_tokens": 999, "chunk_times": chunks}}}


def test_summary_counts_server_tokens_and_chunk_gaps_per_class(loadgen):
    hot = _entry(0.0, [0.5, 0.6, 0.7], 3, "a0000")
    cold = _entry(0.2, [1.2, 1.6, 2.0], 3, "a0500")
    failed = {"start_time": 0.1, "end_time": 0.3, "error": {"error_type": "x"}, "info": None}
    run = [hot, cold, failed]
    overall = loadgen.summarise(run, None)
    assert (overall["requests"], overall["errors"], overall["output_tokens"]) == (3, 1, 6)
    assert overall["output_tokens_per_s"] == 3.0  # 6 server tokens over the run's 2 s, not the re-tokenised 999s
    assert overall["ttft_p50_ms"] == 750.0 and overall["itl_p99_ms"] == pytest.approx(400.0, abs=0.5)
    cold_only = loadgen.summarise([cold], run)
    assert cold_only["output_tokens_per_s"] == 1.5  # the class's tokens over the whole run's span
    assert cold_only["ttft_p50_ms"] == 1000.0 and cold_only["tpot_p50_ms"] == 400.0


def test_server_side_reports_engine_busy_steps_and_registry_hits_from_counter_deltas(loadgen):
    before = {'loraflow_inference_step_seconds_count{kind="decode"}': 10.0,
              'loraflow_inference_step_seconds_sum{kind="decode"}': 1.0,
              'loraflow_inference_registry_lookups_total{result="cache_hit"}': 5.0,
              'loraflow_inference_registry_lookups_total{result="redis"}': 5.0,
              "loraflow_inference_generated_tokens_total{}": 100.0}
    after = {'loraflow_inference_step_seconds_count{kind="decode"}': 110.0,
             'loraflow_inference_step_seconds_sum{kind="decode"}': 7.0,
             'loraflow_inference_step_seconds_count{kind="prefill"}': 20.0,
             'loraflow_inference_step_seconds_sum{kind="prefill"}': 2.0,
             'loraflow_inference_registry_lookups_total{result="cache_hit"}': 35.0,
             'loraflow_inference_registry_lookups_total{result="redis"}': 15.0,
             "loraflow_inference_generated_tokens_total{}": 1400.0}
    side = loadgen.server_side(before, after, wall=10.0)
    assert side["steps"]["decode"] == {"steps": 100, "seconds": 6.0, "mean_ms": 60.0}
    assert side["steps"]["prefill"] == {"steps": 20, "seconds": 2.0, "mean_ms": 100.0}
    assert side["engine_busy_fraction"] == 0.8  # 8 s of steps in 10 s
    assert side["tokens_per_step"] == 10.83  # 1300 tokens over 120 steps
    assert side["registry_lookups"] == {"cache_hit": 30, "redis": 10, "saved_fraction": 0.75}
    assert loadgen.server_side({}, {}, wall=1.0) == {"counters": {}}


def test_scrape_reads_the_counters_of_a_prometheus_text_page(loadgen, tmp_path):
    import http.server
    import threading

    page = (b'# TYPE loraflow_inference_registry_lookups_total counter\n'
            b'loraflow_inference_registry_lookups_total{result="cache_hit"} 7.0\n'
            b'loraflow_inference_registry_lookups_total{result="redis"} 2.0\n'
            b'# TYPE loraflow_inference_step_seconds histogram\n'
            b'loraflow_inference_step_seconds_bucket{kind="decode",le="+Inf",model="m"} 3.0\n'
            b'loraflow_inference_step_seconds_count{kind="decode",model="m"} 3.0\n'
            b'loraflow_inference_step_seconds_sum{kind="decode",model="m"} 0.5\n'
            b'# TYPE other_total counter\nother_total 1.0\n')

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        got = loadgen.scrape(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
    assert got == {'loraflow_inference_registry_lookups_total{result="cache_hit"}': 7.0,
                   'loraflow_inference_registry_lookups_total{result="redis"}': 2.0,
                   'loraflow_inference_step_seconds_count{kind="decode"}': 3.0,
                   'loraflow_inference_step_seconds_sum{kind="decode"}': 0.5}


def test_inference_perf_runs_with_its_adapter_draws_seeded(loadgen, tmp_path):
    """inference-perf draws adapters from numpy's global generator in its main process and never seeds it: the
    bench's launcher seeds it, so both servers get the same draws, and hands inference-perf its own argv."""
    import subprocess

    package = tmp_path / "inference_perf"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import sys, numpy\n"
        "def main_cli():\n"
        "    print(sys.argv[1:], numpy.random.choice(1000, size=5).tolist())\n"
        "    return 0\n")

    def launch(seed: int) -> str:
        return subprocess.run([sys.executable, "-c", loadgen._SEEDED_MAIN, str(seed), "-c", "config.yaml"],
                              capture_output=True, text=True, check=True, env={"PYTHONPATH": str(tmp_path)},
                              timeout=60).stdout

    first = launch(7)
    assert first.startswith("['-c', 'config.yaml']")
    assert launch(7) == first and launch(8) != first


def test_cpu_is_counted_over_the_requests_span_only(loadgen):
    # The client starts at 0 s, sends its first request at 10 s and its last answer comes at 20 s.
    samples = [(0.0, 0.0, 0.0), (10.0, 1.0, 8.0), (15.0, 9.0, 10.0), (20.0, 17.0, 12.0), (30.0, 18.0, 20.0)]
    assert loadgen.span_cpu(samples, 10.0, 20.0) == {"server_seconds": 16.0, "server_cores": 1.6,
                                                     "client_seconds": 4.0, "client_cores": 0.4}
    assert loadgen.span_cpu(samples, 12.5, 17.5)["server_seconds"] == 8.0  # interpolated between samples
    own = loadgen.tree_cpu_seconds(os.getpid())
    assert own > 0 and loadgen.tree_cpu_seconds(os.getpid()) >= own


def test_a_servers_peak_rss_and_cpu_are_read_from_its_processes(loadgen):
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "x = bytearray(64 << 20); sum(range(3_000_000)); "
                                                    "import time; time.sleep(30)"])
    try:
        server = loadgen.Server("s", "http://127.0.0.1:1", "m", processes=[child])
        import time

        for _ in range(200):
            if server.peak_rss_mib() >= 64:
                break
            time.sleep(0.05)
        assert server.peak_rss_mib() >= 64 and server.cpu_seconds() > 0
    finally:
        child.kill()
        child.wait()


def test_warm_up_sends_the_runs_shape_at_its_concurrency_before_the_run(loadgen, tmp_path):
    import http.server
    import json
    import threading
    import time

    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))  # one token a word
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    prompts = loadgen.warmup_prompts(tmp_path, 6, 12)
    assert len(set(prompts)) == 6 and all(len(p.split()) == 12 for p in prompts)

    bodies, active, peak = [], [0], [0]
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the stdlib's name
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            bodies.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            time.sleep(0.2)
            with lock:
                active[0] -= 1
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = loadgen.Server("s", f"http://127.0.0.1:{server.server_port}", "base-model")
        got = loadgen.warm_up_run(target, prompts, 5, 3)
        assert loadgen.warm_up_run(target, [], 5, 3)["requests"] == 0
    finally:
        server.shutdown()
    assert got["requests"] == 6 and len(bodies) == 6 and peak[0] == 3
    assert sorted(b["prompt"] for _, b in bodies) == sorted(prompts)
    assert {(path, b["model"], b["max_tokens"], b["ignore_eos"]) for path, b in bodies} == \
        {("/v1/completions", "base-model", 5, True)}


def test_adapter_slots_takes_auto_or_a_count(loadgen):
    parse = loadgen.build_parser().parse_args
    assert parse([]).adapter_slots == "auto" and parse(["--adapter-slots", "auto"]).adapter_slots == "auto"
    assert parse(["--adapter-slots", "12"]).adapter_slots == 12
    for bad in ("0", "many"):
        with pytest.raises(SystemExit):
            parse(["--adapter-slots", bad])
