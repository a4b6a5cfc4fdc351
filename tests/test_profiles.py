"""Device profiles: the built-in set, validation of user files, and the `profiles` command."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edge_fslm.cli import CliGroup
from edge_fslm.convert import QUANT_TYPES
from edge_fslm.convert.cli import profiles as profiles_cmd
from edge_fslm.errors import ManifestError
from edge_fslm.manifest import RuntimeSpec, load_builtin
from edge_fslm.memory import parse_budget
from edge_fslm.convert.device_profile import (
    KV_CACHE_TYPES,
    Profile,
    list_profiles,
    load_profile,
    parse_profile,
    profile_names,
)

REQUIRED = {"pi-zero-2w", "pi4-2gb", "pi5-8gb", "laptop-8gb", "laptop-metal", "quality"}

GOOD = """
[profile]
description = "My board"
[quant]
default = "q4_k_m"
[quant.stages]
answer = "Q8_0"
[runtime]
ctx_size = 1024
threads = 2
batch_size = 128
kv_cache_type = "q8_0"
mmap = false
gpu_layers = 0
budget = "256MiB"
"""


def test_builtin_profiles_load_and_cover_the_devices():
    profiles = list_profiles()
    assert REQUIRED <= {p.name for p in profiles}
    assert [p.name for p in profiles] == profile_names() == sorted(profile_names())
    for p in profiles:
        assert p.builtin and p.description and p.quant in QUANT_TYPES
        assert p.kv_cache_type in KV_CACHE_TYPES and p.batch_size <= p.ctx_size
        rt = p.runtime()
        assert {"ctx_size", "threads", "batch_size", "kv_cache_type", "mmap", "gpu_layers", "policy"} <= set(rt)
        assert set(rt) - {"kv_cache_type"} <= set(RuntimeSpec.__dataclass_fields__)
    tiny = load_profile("pi-zero-2w")
    assert tiny.runtime()["budget"] == "300MB" and tiny.kv_cache_type == "q8_0"
    assert parse_budget(tiny.budget) <= 512e6, "a 512 MB board needs a budget below its RAM"
    assert load_profile("laptop-metal").gpu_layers == -1
    assert load_profile("quality").quant == "F16"


def test_stage_overrides():
    p = load_profile("laptop-8gb")
    assert p.quant_for("answer") == "Q8_0" and p.quant_for("keywords") == p.quant == "Q6_K"


def test_profile_file(tmp_path):
    f = tmp_path / "board.toml"
    f.write_text(GOOD)
    p = load_profile(f)
    assert isinstance(p, Profile) and p.name == "board" and p.path == f and not p.builtin
    assert p.quant == "Q4_K_M" and p.stage_quants == {"answer": "Q8_0"}
    assert p.runtime() == {"ctx_size": 1024, "threads": 2, "batch_size": 128, "kv_cache_type": "q8_0",
                           "mmap": False, "gpu_layers": 0, "budget": "256MiB", "policy": "auto"}
    assert load_profile(str(f)).name == "board"


def test_every_problem_is_reported_at_once():
    bad = GOOD.replace("ctx_size = 1024", "ctx_sise = 1024").replace('"256MiB"', '"lots"') \
        .replace('default = "q4_k_m"', 'default = "Q4_KM"').replace("threads = 2", "threads = \"two\"") \
        .replace('kv_cache_type = "q8_0"', 'kv_cache_type = "q3"').replace("mmap = false", "mmap = 1")
    with pytest.raises(ManifestError) as exc:
        parse_profile(bad, origin="bad.toml")
    lines = str(exc.value).splitlines()
    assert len(lines) == 6
    text = str(exc.value)
    assert "bad.toml: runtime.ctx_sise: unknown key (did you mean 'ctx_size'?)" in text
    assert "did you mean 'Q4_K_M'?" in text
    assert "runtime.budget: budget 'lots'" in text and "runtime.threads" in text
    assert "runtime.kv_cache_type" in text and "runtime.mmap" in text


@pytest.mark.parametrize("text, match", [
    ("[quant]\ndefault = 'Q4_0'\n", "profile.description: missing"),
    ("[profile]\ndescription = 'x'\n", r"missing \[quant\] table"),
    ("[profile]\ndescription = 'x'\n[quant]\ndefault = 'Q4_0'\nadapter = 'q8_0'\n", "quant.adapter"),
    ("[profile]\ndescription = 'x'\n[quant]\ndefault = 'Q4_0'\n[runtime]\nctx_size = 64\nbatch_size = 128\n",
     "larger than ctx_size"),
    ("[profile]\ndescription = 'x'\n[quant]\ndefault = 'Q4_0'\n[runtime]\nbudget = '150%'\n", "between 0 and 100"),
    ("[profile]\ndescription = 'x'\n[quant]\ndefault = 'Q4_0'\n[runtime]\npolicy = 'fastest'\n", "policy"),
    ("[profile\n", "not valid TOML"),
])
def test_bad_profiles(text, match):
    with pytest.raises(ManifestError, match=match):
        parse_profile(text)


def test_unknown_profile_names(tmp_path):
    with pytest.raises(ManifestError, match="did you mean 'pi4-2gb'"):
        load_profile("pi4-2g")
    with pytest.raises(ManifestError, match="no such profile file"):
        load_profile(tmp_path / "missing.toml")
    with pytest.raises(ManifestError, match="is a directory"):
        load_profile(tmp_path)


def test_profiles_command():
    group = CliGroup(commands={"profiles": profiles_cmd})
    res = CliRunner().invoke(group, ["profiles"])
    assert res.exit_code == 0, res.output
    for name in REQUIRED:
        assert name in res.output
    assert "512 MB" in res.output and "kv q8_0" in res.output
    res = CliRunner().invoke(group, ["profiles", "--json"])
    rows = json.loads(res.output)
    assert {r["name"] for r in rows} >= REQUIRED and all(r["description"] for r in rows)


@pytest.mark.parametrize("kv", ["q4_0", "bf16"])
def test_a_kv_cache_type_stacks_refuse_is_refused_in_the_profile(kv):
    """A profile once accepted every llama.cpp cache type while stack manifests take three, so
    `build` wrote a stack that would not load; the profile now says so at once."""
    with pytest.raises(ManifestError, match="runtime.kv_cache_type: expected one of f16, q8_0, f32"):
        parse_profile(GOOD.replace('kv_cache_type = "q8_0"', f'kv_cache_type = "{kv}"'))
    with pytest.raises(ManifestError, match="kv_cache_type: expected one of f16, q8_0, f32"):
        load_builtin("fslm-smollm2").with_runtime(kv_cache_type=kv)


def test_every_profile_runtime_is_one_a_stack_manifest_accepts():
    stack = load_builtin("fslm-smollm2")
    for p in list_profiles() + [parse_profile(GOOD.replace('"q8_0"', '"F32"'))]:
        rt = {k: v for k, v in p.runtime().items() if k in RuntimeSpec.__dataclass_fields__}
        assert stack.with_runtime(**rt).runtime.kv_cache_type == p.kv_cache_type, p.name
