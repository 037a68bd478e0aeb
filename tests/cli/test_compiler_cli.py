"""`loraflow compile/artifacts` and cross-service `jobs list` against the real compiler API in-process."""

from __future__ import annotations

import json


def test_artifacts_empty_and_unknown_is_not_found(compiler_address, cli, cli_json):
    assert cli_json("artifacts", "list", compiler=compiler_address) == {"artifacts": []}
    code, out, err = cli("artifacts", "get", "f" * 16, "-o", "json", compiler=compiler_address)
    assert code == 1 and out == ""
    detail = json.loads(err)["error"]
    assert detail["code"] == "NOT_FOUND" and detail["field"] == "artifact_id"


def test_compile_rejects_bad_options_and_adapters_before_queueing(compiler_address, cli, tiny_llama):
    compiler = compiler_address
    code, _, err = cli("compile", str(tiny_llama), "--adapters", "no-such-adapter", "-o", "json", compiler=compiler)
    assert code == 1
    detail = json.loads(err)["error"]
    assert detail["code"] in ("INVALID_ARGUMENT", "NOT_FOUND") and detail["field"] == "adapters[0]"
    code, _, err = cli("compile", str(tiny_llama), "--adapters", "a", "--ctx-len", "16", "--prefill-seq-len", "32",
                       compiler=compiler)
    assert code == 1 and "INVALID_ARGUMENT" in err and "field: options." in err
    # The quantisation and AI 100 flags reach the server's validation under their own field names.
    for flags, field in ((["--dtype", "fp32", "--quant-block-size", "64"], "options.quant_block_size"),
                         (["--dtype", "int4", "--quant-block-size", "48"], "options.quant_block_size"),
                         (["--dtype", "int8", "--quant-accuracy-level", "7"], "options.quant_accuracy_level"),
                         (["--ai100-stage", "export"], "options.ai100_stage"),
                         (["--target", "ai100", "--compiler-option", "-bad value"], "options.compiler_options")):
        code, _, err = cli("compile", str(tiny_llama), *flags, "-o", "json", compiler=compiler)
        assert code == 1, flags
        detail = json.loads(err)["error"]
        assert (detail["code"], detail["field"]) == ("INVALID_ARGUMENT", field), (flags, detail)
    code, out, _ = cli("jobs", "list", "--kind", "compile", "-o", "json", compiler=compiler)
    assert code == 0 and json.loads(out) == {"jobs": []}


def test_jobs_list_merges_trainer_and_compiler(train_jobs_server, compiler_address, cli_json):
    train_id = train_jobs_server.queue.submit({}).id
    from loraflow.jobs.queue import JobQueue

    compile_id = JobQueue(train_jobs_server.redis, "compile").submit({}).id
    jobs = cli_json("jobs", "list", trainer=train_jobs_server.address, compiler=compiler_address)["jobs"]
    assert [j["id"] for j in jobs] == [compile_id, train_id]
    assert [j["kind"] for j in jobs] == ["JOB_KIND_COMPILE", "JOB_KIND_TRAIN"]
    # `jobs get` routes by the id's kind prefix to the service that owns it.
    got = cli_json("jobs", "get", compile_id, trainer=train_jobs_server.address, compiler=compiler_address)
    assert got["id"] == compile_id
