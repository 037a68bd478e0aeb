"""`loraflow models/load/load-adapter/generate` against the real inference API (no artifact loaded: the
error paths and the empty listing; serving real artifacts is covered by the inference and e2e suites)."""

from __future__ import annotations

import json


def test_models_list_is_empty_and_health_says_not_serving(inference_address, cli, cli_json):
    assert cli_json("models", "list", inference=inference_address) == {"models": []}
    code, out, _ = cli("health", "inference", "-o", "json", inference=inference_address)
    assert code == 1 and json.loads(out)["services"][0]["status"] == "NOT_SERVING"
    code, out, _ = cli("health", "inference", "--live", inference=inference_address)
    assert code == 0 and "NOT_SERVING" in out


def test_load_unknown_artifact_is_not_found_with_field(inference_address, cli):
    code, out, err = cli("load", "0" * 16, "-o", "json", inference=inference_address)
    assert code == 1 and out == ""
    detail = json.loads(err)["error"]
    assert detail["code"] == "NOT_FOUND" and detail["field"] == "artifact_id"


def test_generate_needs_a_loaded_model(inference_address, cli):
    code, _, err = cli("generate", "hello", inference=inference_address)
    assert code == 1 and "INVALID_ARGUMENT" in err and "field: model" in err
    code, _, err = cli("generate", "--model", "nope", "hello", "-o", "json", inference=inference_address)
    assert code == 1 and json.loads(err)["error"]["code"] == "NOT_FOUND"
    code, _, err = cli("load-adapter", "nope", "some-adapter", inference=inference_address)
    assert code == 1 and "NOT_FOUND" in err


def test_models_import_unknown_name_names_the_field(cli):
    code, out, err = cli("models", "import", "gpt-17", "-o", "json")
    assert code == 1 and out == ""
    detail = json.loads(err)["error"]
    assert detail["code"] == "INVALID_ARGUMENT" and detail["field"] == "name" and detail["value"] == "gpt-17"
