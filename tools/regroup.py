"""Regroup loraflow/'s flat modules into subpackages by layer (issue 21 item 4), on any checkout of the tree.

Run from the repository root:  python tools/regroup.py

It `git mv`s each module of MOVES, then rewrites every reference in the tracked text files:
``from loraflow import x`` (split so that a moved module is imported from its package, under its old name),
``from loraflow.x import ...``, ``import loraflow.x``, ``loraflow.x.attr`` in code and strings
(monkeypatch targets, logger names, ``python -m``, import-linter contracts, DECLARING_MODULES),
``loraflow/x.py`` paths and ``"loraflow" / "x.py"`` joins; regenerates the import-linter layers of
pyproject.toml and the layer map of docs/internals.md; and sorts the imports it touched (ruff's isort).
It only reads and writes the working tree and the index; it commits nothing. Running it again is a no-op.
Stdlib only (ruff is called if it is there: ``.venv/bin/ruff`` or on PATH).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

# old module (under loraflow/) -> new dotted path. Basenames are kept, so comments that name a sibling
# file (`see graph_contract.py`) stay true; the one exception is jobs.py, whose name the package takes.
MOVES: dict[str, str] = {
    # artifact contract: graph names, manifest, PEFT files -> banks, supported families
    "graph_contract": "loraflow.artifact.graph_contract",
    "lora_bank": "loraflow.artifact.lora_bank",
    "manifest": "loraflow.artifact.manifest",
    "adapter_files": "loraflow.artifact.adapter_files",
    "model_families": "loraflow.artifact.model_families",
    # jobs on Redis: the queue, its gRPC service, the queue-backed process shape, the registry
    "jobs": "loraflow.jobs.queue",
    "job_service": "loraflow.jobs.job_service",
    "queue_service": "loraflow.jobs.queue_service",
    "registry": "loraflow.jobs.registry",
    "registry_rebuild": "loraflow.jobs.registry_rebuild",
    "embedded_redis": "loraflow.jobs.embedded_redis",
    # storage: object stores, the storage service and its client side, what a request may name
    "store": "loraflow.storage.store",
    "storage_layout": "loraflow.storage.storage_layout",
    "storage_service": "loraflow.storage.storage_service",
    "transfer": "loraflow.storage.transfer",
    "upload_sweeper": "loraflow.storage.upload_sweeper",
    "model_source": "loraflow.storage.model_source",
    "models_import": "loraflow.storage.models_import",
    # server plumbing: bootstrap, interceptors, status mapping, health probes, preparation pool
    "grpc_server": "loraflow.server.grpc_server",
    "server_concurrency": "loraflow.server.server_concurrency",
    "message_limits": "loraflow.server.message_limits",
    "error_status": "loraflow.server.error_status",
    "preparation": "loraflow.server.preparation",
    "redis_health": "loraflow.server.redis_health",
    # options: settings registry, process config, strict config.json, names, sampling fields, budget
    "config": "loraflow.options.config",
    "settings": "loraflow.options.settings",
    "hf_config": "loraflow.options.hf_config",
    "names": "loraflow.options.names",
    "sampling_params": "loraflow.options.sampling_params",
    "budget": "loraflow.options.budget",
    # the terminal side of the user-facing layer (cli.py and client.py stay where users import them)
    "up": "loraflow.console.up",
    "formatting": "loraflow.console.formatting",
}

PACKAGE_DOCS: dict[str, str] = {
    "artifact": "The artifact contract: graph names (graph_contract), manifest.json (manifest), PEFT adapter\n"
                "files and the stacked banks built from them (adapter_files, lora_bank), the supported model\n"
                "families; and its runtime half: the KV caches and the step drivers that both verification\n"
                "(before an artifact is published) and the inference service use to run a compiled graph\n"
                "(step_driver.FusedStepDriver for the fused graph, traced_step_driver.TracedStepDriver for the traced\n"
                "one), the scheduler and the AI 100 stepper.",
    "jobs": "Jobs on Redis: the queue and its workers (queue), JobService (job_service), the process shape of\n"
            "the queue-backed services (queue_service), the adapter/artifact registry and its rebuild from the\n"
            "store, and the embedded redis-server for laptops and tests.",
    "storage": "Storage: object stores (store), the key layout and limits (storage_layout), StorageService and\n"
               "its client side (storage_service, transfer), the sweeper of uncommitted uploads, what a request\n"
               "may name as a model source (model_source) and `loraflow models import` (models_import).",
    "server": "Server plumbing shared by the three services: the gRPC bootstrap (grpc_server), errors as gRPC\n"
              "statuses (error_status), message and concurrency limits, the health probes (redis_health) and\n"
              "the bounded pool for model-sized request preparation (preparation).",
    "options": "Options: the LORAFLOW_* settings registry (settings) and process config (config), the strict\n"
               "config.json reader (hf_config), user-chosen names, the sampling fields and the memory budget.",
    "console": "The terminal side of the user-facing layer: `loraflow up` (up) and what the CLI prints\n"
               "(formatting). The CLI itself is loraflow/cli.py and the client loraflow/client.py.",
}
HOLDS: dict[str, str] = {  # the short form, for the rooms table of docs/internals.md
    "artifact": "the artifact contract (graph names, manifest, adapter files and banks, families) and its runtime half",
    "jobs": "Redis jobs: queue and workers, JobService, the queue-backed process shape, registry, embedded Redis",
    "storage": "object stores, key layout, StorageService and transfers, upload sweeper, model sources and import",
    "server": "gRPC bootstrap, errors as statuses, message and concurrency limits, health probes, preparation pool",
    "options": "settings registry, process config, strict config.json, names, sampling fields, memory budget",
    "console": "the terminal side of the user-facing layer: `loraflow up`, what the CLI prints",
}
# artifact/__init__.py's docstring before the regroup: replaced only while it still reads like this.
OLD_ARTIFACT_DOC_START = '"""The artifact contract\'s runtime half:'

ROOT = Path.cwd()
SELF = Path(__file__).resolve()
TEXT_SUFFIX_SKIP = {".png", ".jpg", ".jpeg", ".gif", ".onnx", ".so", ".whl", ".gz", ".zip", ".pt", ".bin",
                    ".safetensors", ".gguf", ".pdf", ".ico"}
SKIP_DIRS = ("loraflow/v1/",)  # generated protobuf code: regenerated, never edited


def new_path(old: str) -> str:
    return MOVES[old].replace(".", "/") + ".py"


def package_of(old: str) -> str:
    return MOVES[old].split(".")[1]


def members(package: str) -> set[str]:
    """Module names inside loraflow/<package>/ after the regroup (moved ones and the files already there)."""
    found = {new.split(".")[-1] for new in MOVES.values() if new.split(".")[1] == package}
    folder = ROOT / "loraflow" / package
    if folder.is_dir():
        found |= {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if p.is_dir()}
    return found - {"__init__"}


# Old modules whose name a package now takes (loraflow.jobs): a bare `loraflow.jobs` is ambiguous after the
# regroup, so it is rewritten only while loraflow/jobs.py still existed when this run started.
PACKAGE_NAMED = {old for old in MOVES if MOVES[old].startswith(f"loraflow.{old}.")}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


# -- 1. the moves -----------------------------------------------------------------------------------------

def move_modules() -> list[str]:
    moved = []
    for old in MOVES:
        src, dst = ROOT / "loraflow" / f"{old}.py", ROOT / new_path(old)
        if src.exists() and dst.exists():
            sys.exit(f"regroup: both {src.relative_to(ROOT)} and {dst.relative_to(ROOT)} exist; merge them by hand")
        if not src.exists():
            if not dst.exists():
                print(f"regroup: note: neither loraflow/{old}.py nor {new_path(old)} exists (removed upstream?)")
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        git("mv", str(src.relative_to(ROOT)), str(dst.relative_to(ROOT)))
        moved.append(old)
    for package, doc in PACKAGE_DOCS.items():
        init = ROOT / "loraflow" / package / "__init__.py"
        body = f'"""{doc}"""\n'
        if not init.exists():
            init.parent.mkdir(parents=True, exist_ok=True)
            init.write_text(body)
            git("add", str(init.relative_to(ROOT)))
        elif init.read_text().startswith(OLD_ARTIFACT_DOC_START) and package == "artifact":
            text = init.read_text()
            end = text.index('"""', 3) + 3
            init.write_text(body + text[end:].lstrip("\n"))
    return moved


# -- 2. the references ------------------------------------------------------------------------------------

_NAMES = "|".join(sorted(MOVES, key=len, reverse=True))
# loraflow.<old> as a dotted name, not part of a longer one (loraflow.upload_sweeper is not loraflow.up).
DOTTED = re.compile(rf"(?<![\w.])loraflow\.({_NAMES})(?![\w])(?P<attr>\.\w+)?")
# loraflow/<old>.py (or loraflow/<old>.attr in prose); not s3://loraflow/store nor ~/.loraflow/store.
SLASHED = re.compile(rf"(?<![\w/.:~-])loraflow/({_NAMES})(?=\.\w)(?P<ext>\.py\b)?")
# ROOT / "loraflow" / "settings.py"
JOINED = re.compile(rf"""(?P<q1>["'])loraflow(?P=q1)(?P<sep>\s*/\s*)(?P<q2>["'])({_NAMES})\.py(?P=q2)""")
# the head of `from loraflow import ...` / `from loraflow.jobs import ...` (whose names decide the rewrite)
FROM_HEAD = re.compile(r"^(?P<indent>[ \t]*)from[ \t]+(?P<mod>loraflow(?:\.\w+)?)[ \t]+import[ \t]+", re.M)


def _import_names_end(text: str, start: int) -> tuple[int, list[str], str]:
    """From just after `import `: (end of the statement, the names as written, a trailing comment)."""
    comment = ""
    if text.startswith("(", start):
        depth, i, body = 0, start, []
        while i < len(text):
            c = text[i]
            if c == "#":
                nl = text.find("\n", i)
                i = len(text) if nl < 0 else nl
                continue
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth == 0:
                    i += 1
                    break
            else:
                body.append(c)
            i += 1
        end = i
        rest = text[end:text.find("\n", end) if text.find("\n", end) >= 0 else len(text)]
        if rest.strip().startswith("#"):
            comment = rest.strip()
            end += len(rest)
        names_text = "".join(body)
    else:
        i = start
        while True:
            nl = text.find("\n", i)
            nl = len(text) if nl < 0 else nl
            line = text[i:nl]
            if line.rstrip().endswith("\\") and "#" not in line:
                i = nl + 1
                continue
            break
        end = nl
        names_text = text[start:end].replace("\\\n", " ")
        if "#" in names_text:
            names_text, comment = names_text.split("#", 1)
            comment = "#" + comment.rstrip()
    names = [" ".join(n.split()) for n in names_text.replace("\n", " ").split(",") if n.strip()]
    return end, names, comment


def _from_loraflow(indent: str, names: list[str], comment: str) -> str | None:
    """`from loraflow import a, b as c` with moved modules among a, b: one statement per package."""
    stay: list[str] = []
    by_package: dict[str, list[str]] = {}
    for name in names:
        base, _, alias = name.partition(" as ")
        base, alias = base.strip(), alias.strip()
        if base not in MOVES:
            stay.append(name)
            continue
        *parent, leaf = MOVES[base].split(".")
        if leaf != base and not alias:
            alias = base  # jobs.py is now jobs/queue.py: still `jobs` in the importing module
        by_package.setdefault(".".join(parent), []).append(leaf + (f" as {alias}" if alias else ""))
    if not by_package:
        return None
    lines = []
    if stay:
        lines.append(f"{indent}from loraflow import {', '.join(stay)}")
    for parent in sorted(by_package):
        lines.append(f"{indent}from {parent} import {', '.join(by_package[parent])}")
    if comment:
        lines[0] += "  " + comment
    return "\n".join(lines)


def _rewrite_plain(text: str, bare_package_named: bool) -> str:
    def dotted(m: re.Match) -> str:
        old, attr = m.group(1), m.group("attr") or ""
        if old in PACKAGE_NAMED:
            if attr and attr[1:] in members(package_of(old)):
                return m.group(0)  # already loraflow.jobs.<member>
            if not attr and not bare_package_named:
                return m.group(0)  # the package itself, after the regroup
        return MOVES[old] + attr

    def slashed(m: re.Match) -> str:
        old = m.group(1)
        if old in PACKAGE_NAMED and not m.group("ext"):
            return m.group(0)
        return new_path(old)[: -len(".py")] + (m.group("ext") or "")

    def joined(m: re.Match) -> str:
        q1, sep, q2 = m.group("q1"), m.group("sep"), m.group("q2")
        parts = new_path(m.group(4)).split("/")  # loraflow, package, module.py
        return f"{q1}loraflow{q1}" + "".join(f"{sep}{q2}{part}{q2}" for part in parts[1:])

    text = DOTTED.sub(dotted, text)
    text = SLASHED.sub(slashed, text)
    return JOINED.sub(joined, text)


def rewrite_text(text: str, bare_package_named: bool) -> str:
    out, pos = [], 0
    for m in FROM_HEAD.finditer(text):
        if m.start() < pos:
            continue
        mod = m.group("mod")
        old = mod.split(".", 1)[1] if "." in mod else None
        if mod != "loraflow" and old not in PACKAGE_NAMED:
            continue  # `from loraflow.store import ...`: the dotted rewrite does it
        end, names, comment = _import_names_end(text, m.end())
        if mod == "loraflow":
            new = _from_loraflow(m.group("indent"), names, comment)
        else:  # from loraflow.jobs import ...: the package's members, or the old module's names
            bases = {n.partition(" as ")[0].strip() for n in names}
            if bases <= members(package_of(old)):
                new = text[m.start():end]
            elif bases & members(package_of(old)):
                print(f"regroup: warning: mixed import left as is: {text[m.start():end]!r}")
                new = text[m.start():end]
            else:
                head = text[m.start():m.end()].replace(mod, MOVES[old], 1)
                new = head + text[m.end():end]
        if new is None:
            continue
        out.append(_rewrite_plain(text[pos:m.start()], bare_package_named))
        out.append(new)
        pos = end
    out.append(_rewrite_plain(text[pos:], bare_package_named))
    return "".join(out)


def text_files() -> list[Path]:
    files = []
    for rel in git("ls-files", "-z").split("\0"):
        if not rel or rel.startswith(SKIP_DIRS):
            continue
        path = ROOT / rel
        if path.resolve() == SELF or path.suffix.lower() in TEXT_SUFFIX_SKIP or not path.is_file() \
                or path.is_symlink():
            continue
        files.append(path)
    return files


def rewrite_references(bare_package_named: bool) -> list[Path]:
    changed = []
    for path in text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if "\0" in text or "loraflow" not in text:
            continue
        new = rewrite_text(text, bare_package_named)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


# -- 3. the import-linter layers (names relative to the loraflow container) -------------------------------

LAYERS_BLOCK = re.compile(r'(?ms)^(?P<head>layers = \[\n)(?P<body>.*?)^\]')
LAYER_STRING = re.compile(r'(?s)("""|")(.*?)\1')


def _layer_string(names: list[str]) -> str:
    one = " : ".join(names)
    if len(one) <= 100:
        return f'    "{one}",\n'
    lines, line = [], ""
    for i, name in enumerate(names):
        piece = name + (" : " if i < len(names) - 1 else "")
        if line and len(line) + len(piece.rstrip()) > 100:
            lines.append(line.rstrip() + " \\")
            line = "       "
        line += piece
    lines.append(line)
    return '    """' + "\n".join(lines) + '""",\n'


def rewrite_layers() -> bool:
    path = ROOT / "pyproject.toml"
    text = path.read_text()
    if 'containers = ["loraflow"]' not in text:
        print("regroup: warning: no import-linter layers contract on the loraflow container found")
        return False
    block = LAYERS_BLOCK.search(text, text.index('containers = ["loraflow"]'))
    if not block:
        return False
    layers: list[list[str]] = []
    placed: set[str] = set()
    for quoted in LAYER_STRING.finditer(block.group("body")):
        names = []
        for raw in quoted.group(2).replace("\\\n", " ").split(":"):
            name = raw.strip()
            if not name:
                continue
            optional = name.startswith("(") and name.endswith(")")
            bare = name.strip("()").strip()
            if bare in MOVES:
                bare, optional = package_of(bare), False
            if bare in placed:
                continue  # a package with modules of two layers sits in the higher one (console: up)
            placed.add(bare)
            names.append(f"({bare})" if optional else bare)
        layers.append(sorted(names, key=lambda n: n.strip("()")))
    body = "".join(_layer_string(names) for names in layers)
    new = text[:block.start("body")] + body + text[block.end("body"):]
    # The services must not import any of the console package (the rewrite above named only its `up`).
    new = re.sub(r'(?m)^(forbidden_modules = \[.*)"loraflow\.console\.up"', r'\1"loraflow.console"', new)
    if new != text:
        path.write_text(new)
        return True
    return False


# -- 4. docs/internals.md: the layer map and the rooms -----------------------------------------------------

LAYER_MAP = """\
user-facing     loraflow.api  loraflow.compat  loraflow.cli  loraflow.client  loraflow.console (up, formatting)
                   │ may import the services and the core library
services        services.trainer │ services.compiler │ services.inference      (never each other,
                   │                                                            never the layer above)
core library    every other loraflow package, one room per part (package imports point down):
                  jobs/       Redis jobs, JobService, queue-backed process shape, registry, embedded Redis
                    │ imports storage/, server/, options/
                  storage/    object stores, StorageService, transfers, model sources     → options/
                  server/     gRPC bootstrap, status mapping, limits, health, preparation  → options/
                  artifact/   the artifact contract and its runtime half                   (errors only)
                  options/    settings registry, config, hf_config, names, sampling fields, budget
                  security/   used by all of the above; its own upper modules (auth, limits, settings) import
                              options.settings, server.error_status and storage.storage_layout, so between
                              packages security/ is not strictly below (between modules there is no cycle)
                  errors, native, v1
"""
ROOMS_START = "<!-- rooms: written by tools/regroup.py -->"
ROOMS_END = "<!-- /rooms -->"


def rooms_section() -> str:
    rows = ["| room | holds | modules |", "|---|---|---|"]
    for package in ("artifact", "jobs", "storage", "server", "options", "console"):
        folder = ROOT / "loraflow" / package
        modules = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
        rows.append(f"| `loraflow/{package}/` | {HOLDS[package]} | {', '.join(f'`{m}`' for m in modules)} |")
    moved = ", ".join(f"`{old}` → `{MOVES[old].split('.', 1)[1]}`" for old in MOVES)
    return (f"{ROOMS_START}\n### Rooms of `loraflow/`\n\n"
            "The core library is grouped by layer into packages (issue 21 item 4, done by `tools/regroup.py`);\n"
            "`loraflow/errors.py`, `loraflow/cli.py` and `loraflow/client.py` stay at the top (`loraflow = "
            "\"loraflow.cli:app\"`,\n`from loraflow.client import Client`). Modules keep their names but "
            "`jobs.py`, now `jobs/queue.py`.\n\n" + "\n".join(rows) + f"\n\nMoved: {moved}.\n{ROOMS_END}\n")


def rewrite_docs() -> bool:
    path = ROOT / "docs" / "internals.md"
    if not path.exists():
        return False
    text = path.read_text()
    heading = re.search(r"(?m)^## Layers.*\n\n```\n", text)
    if not heading:
        print("regroup: warning: docs/internals.md has no '## Layers' code block; layer map not written")
        return False
    close = text.index("```", heading.end())
    new = text[:heading.end()] + LAYER_MAP + text[close:]
    section = rooms_section()
    if ROOMS_START in new:
        start, end = new.index(ROOMS_START), new.index(ROOMS_END) + len(ROOMS_END) + 1
        new = new[:start] + section + new[end:]
    else:  # after the layers' code block
        after = new.index("```", heading.end()) + 3
        after = new.index("\n", after) + 1
        new = new[:after] + "\n" + section + new[after:]
    if new != text:
        path.write_text(new)
        return True
    return False


# -- 5. import order ---------------------------------------------------------------------------------------

def sort_imports(paths: list[Path]) -> None:
    py = [str(p.relative_to(ROOT)) for p in paths if p.suffix == ".py"]
    if not py:
        return
    ruff = ROOT / ".venv" / "bin" / "ruff"
    ruff = str(ruff) if ruff.exists() else shutil.which("ruff")
    if not ruff:
        print("regroup: warning: ruff not found; run `ruff check --select I --fix` on the changed files")
        return
    subprocess.run([ruff, "check", "--quiet", "--select", "I", "--fix", "--exit-zero", *py], cwd=ROOT, check=True)


def main() -> None:
    if not (ROOT / "loraflow" / "errors.py").exists() or not (ROOT / "pyproject.toml").exists():
        sys.exit("regroup: run from the loraflow repository root: python tools/regroup.py")
    bare_package_named = any((ROOT / "loraflow" / f"{old}.py").exists() for old in PACKAGE_NAMED)
    moved = move_modules()
    changed = rewrite_references(bare_package_named)
    layers = rewrite_layers()
    docs = rewrite_docs()
    sort_imports(changed)
    stale = [f"{p.relative_to(ROOT)}" for p in ROOT.glob("loraflow/*.py") if p.stem in MOVES]
    if stale:
        sys.exit(f"regroup: still at the top after the moves: {stale}")
    print(f"regroup: moved {len(moved)} modules, rewrote {len(changed)} files"
          f"{', the import-linter layers' if layers else ''}{', docs/internals.md layer map' if docs else ''}"
          + ("" if moved or changed or layers or docs else " (nothing to do: already regrouped)"))


if __name__ == "__main__":
    main()
