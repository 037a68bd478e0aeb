"""`loraflow adapters register NAME DIR|URI --base ...` against a real trainer API that, like one in a container,
reads no host path: the local adapter directory and base model are pushed through StorageService first, as
`loraflow train ./model ...` pushes its inputs. Real gRPC with token auth, real Redis, a real file store."""

from __future__ import annotations

import json

from tests.cli.test_storage_cli import TOKEN, remote, workdir  # noqa: F401 - fixtures

__all__ = ["TOKEN"]


def test_register_pushes_local_inputs_then_is_idempotent_and_refuses_a_conflict(remote, workdir, cli):  # noqa: F811
    addresses = {"trainer": remote.trainer, "compiler": remote.compiler}
    code, out, err = cli("adapters", "register", "imported", "./peft-dir", "--base", "./model", "-o", "json",
                         **addresses)
    assert code == 0, err
    first = json.loads(out)
    adapter = first["adapter"]
    assert first["already_registered"] is False and adapter["name"] == "imported" and adapter["job_id"] == ""
    assert adapter["uri"].startswith(remote.store.uri("adapters/imported/registered."))
    # The trainer saw no host path: the base is the pushed model's store URI, and both pushes were reported.
    assert adapter["base_model"].startswith(remote.store.uri("uploads/models/model/"))
    said = err.replace("\n", "")
    assert "uploaded peft-dir ->" in said and "uploaded model ->" in said
    assert adapter["lora"]["r"] == 4 and adapter["lora"]["target_modules"] == ["q_proj", "v_proj"]
    key = remote.store.key_of(adapter["uri"])
    assert remote.store.get_bytes(f"{key}/adapter_config.json") == (workdir / "peft-dir" / "adapter_config.json").read_bytes()
    assert remote.registry.get_adapter("imported").uri == adapter["uri"]

    # The same command again: nothing written, said so in the table.
    code, out, err = cli("adapters", "register", "imported", "./peft-dir", "--base", "./model", **addresses)
    assert code == 0, err
    assert "already registered, nothing written" in out and "imported" in out

    # Another adapter under the name: ALREADY_EXISTS naming the field; the registered one is untouched.
    from tests.compiler.conftest import save_peft_adapter

    save_peft_adapter(workdir / "model", workdir / "other", r=8, lora_alpha=16, target_modules=("q_proj",))
    code, out, err = cli("adapters", "register", "imported", "./other", "--base", "./model", "-o", "json",
                         **addresses)
    assert code == 1
    refusal = json.loads(err.strip().splitlines()[-1])["error"]  # after the push reports
    assert refusal["code"] == "ALREADY_EXISTS" and refusal["field"] == "name"
    assert remote.registry.get_adapter("imported").uri == adapter["uri"]
    assert remote.store.list_dirs("adapters/imported") == [key]

    # Listed with the trained ones; a bad directory is refused with its field before anything is registered.
    code, out, err = cli("adapters", "list", "-o", "json", **addresses)
    assert [a["name"] for a in json.loads(out)["adapters"]] == ["imported"]
    (workdir / "not-peft").mkdir()
    (workdir / "not-peft" / "README.md").write_text("no adapter here\n")
    code, out, err = cli("adapters", "register", "broken", "./not-peft", "--base", "./model", "-o", "json",
                         **addresses)
    assert code == 1
    refusal = json.loads(err.strip().splitlines()[-1])["error"]  # after the push reports
    assert refusal["code"] == "INVALID_ARGUMENT" and refusal["field"] == "uri" and "adapter_config.json" in \
        refusal["message"]
    assert remote.registry.find_adapter("broken") is None
