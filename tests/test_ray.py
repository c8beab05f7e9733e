"""--ray: campaigns and random exploration on a Ray cluster give the local results, run for run.

A Ray head started once for the module (`ray start --head`, as a user would on a cluster's first
machine) with its own auth token; each test runs the CLI against it as a user would.  Ray's
start-up is seconds, so the runs are small.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMING = ("seconds", "schedules_per_second", "ray")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env():
    """The environment of a user of this cluster: the token, no usage reports."""
    e = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(ROOT),
    )
    e.pop("RAY_ADDRESS", None)
    return e


@pytest.fixture(scope="module")
def head(env, tmp_path_factory):
    """HOST:PORT of a 2-CPU Ray head, stopped (by its pid) after the module."""
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.fail("Ray is not installed: pip install 'emu[ray]' (make test installs it)")
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "head.log"
    with open(log, "w") as f:
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ray.scripts.scripts",
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--num-cpus=2",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "will now block forever" not in log.read_text():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        p.terminate()  # `ray start --block` stops the processes it started
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()


def emu(env, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "emu", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def result(p, code):
    assert p.returncode == code, p.stderr
    obj = json.loads(p.stdout)
    return {k: v for k, v in obj.items() if k not in TIMING}, obj.get("ray")


@pytest.fixture(scope="module")
def accept2_elf(tmp_path_factory):
    """The built guest at a path of its own: workers get its bytes, not its path."""
    from emu.userspace import guests

    path = tmp_path_factory.mktemp("guest") / "accept2.elf"
    shutil.copy(guests.resolve("accept2"), path)
    return path


CAMPAIGN = (
    "campaign",
    "--vm",
    "tdx",
    "--vcpus",
    "2",
    "--runs",
    "60",
    "--seed",
    "2",
    "--bug",
    "busy-is-fatal",
    "--json",
)


@pytest.fixture(scope="module")
def local_campaign(env, accept2_elf):
    local, _ = result(emu(env, CAMPAIGN[0], accept2_elf, *CAMPAIGN[1:]), 1)
    assert local["failures"] and all(f["reproducer"] for f in local["failures"])
    return local


def test_campaign_on_ray_is_the_local_campaign(env, head, accept2_elf, local_campaign):
    """The same runs, outcome table, failures in run order and reproducers."""
    remote, ray_info = result(emu(env, CAMPAIGN[0], accept2_elf, *CAMPAIGN[1:], "--ray", head), 1)
    assert remote == local_campaign
    assert ray_info == {"address": head, "workers": 2, "rerun_batches": 0}


def test_a_dead_workers_batch_runs_again(env, head, accept2_elf, local_campaign):
    """The worker running batch 1 dies (os._exit, the hidden --ray-kill-batch); its batch runs on
    another worker, the result says so and is still exact."""
    remote, ray_info = result(
        emu(env, CAMPAIGN[0], accept2_elf, *CAMPAIGN[1:], "--ray", head, "--ray-kill-batch", "1"), 1
    )
    assert remote == local_campaign
    assert ray_info["rerun_batches"] >= 1


EXPLORE = (
    "explore",
    "race2",
    "--vm",
    "tdx",
    "--vcpus",
    "2",
    "--no-freeze",
    "--random",
    "60",
    "--seed",
    "3",
    "--all",
    "--json",
)


def test_explore_on_ray_is_the_local_exploration(env, head):
    """Every run's failure counted, the first by run index (not by arrival), the same minimized
    schedule and trace."""
    local, _ = result(emu(env, *EXPLORE), 1)
    assert local["failures"] > 1 and local["first_failure"]["minimized"]
    remote, ray_info = result(emu(env, *EXPLORE, "--ray", head), 1)
    assert remote == local
    assert ray_info["workers"] == 2


def test_ray_local_starts_and_stops_its_own_runtime(env):
    args = ("explore", "race2", "--vm", "tdx", "--vcpus", "2", "--random", "40", "--seed", "5", "--json")
    local, _ = result(emu(env, *args), 0)
    remote, ray_info = result(emu(env, *args, "--ray", "local"), 0)
    assert remote == local and local["runs"] == 40
    assert ray_info["address"] == "local"


# -- bad input: one line, exit 2, fast ----------------------------------------------------------------------
def one_line_error(p, *words):
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.startswith("emu: error: ") and p.stderr.count("\n") == 1, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_address_with_no_cluster(env, address):
    address = address.format(port=free_port())
    t0 = time.monotonic()
    p = emu(env, "campaign", "hello", "--runs", "3", "--ray", address)
    one_line_error(p, f"--ray {address}: no Ray cluster there")
    assert time.monotonic() - t0 < 15


def test_a_port_that_is_not_ray(env):
    """Something answers, but not Ray's GCS (here an HTTP-less TCP listener): still one fast line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        p = emu(env, "campaign", "hello", "--runs", "3", "--ray", f"127.0.0.1:{port}")
    one_line_error(p, "no Ray cluster there")
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize("address", ["nonsense", "host:port", ":6379"])
def test_a_malformed_address(env, address):
    one_line_error(emu(env, "campaign", "hello", "--runs", "3", "--ray", address), "use local, auto, HOST:PORT")


def test_a_guest_path_that_does_not_exist(env, tmp_path):
    one_line_error(emu(env, "campaign", tmp_path / "gone.elf", "--runs", "3", "--ray", "local"), "no such file")


def test_ray_only_with_random_exploration(env):
    one_line_error(emu(env, "explore", "race2", "--vm", "tdx", "--vcpus", "2", "--ray", "local"), "--random")


def test_ray_not_installed(monkeypatch, capsys):
    from emu import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    assert cli.main(["campaign", "hello", "--runs", "3", "--ray", "local"]) == 2
    err = capsys.readouterr().err
    assert err == "emu: error: --ray needs Ray, an optional extra: pip install 'emu[ray]'\n"


def test_the_hidden_option_is_hidden():
    from emu import cli

    helps = [a.format_help() for a in cli.build_parser()._subparsers._group_actions[0].choices.values()]
    assert all("--ray-kill-batch" not in h for h in helps)
    assert sum("--ray ADDRESS" in h for h in helps) == 2


def test_hangs_on_ray_are_the_local_hangs(env, head):
    """Runs past their limit (the schedules that lose lost_wakeup's wake-up) hang on the Ray workers
    exactly as they do here: the same failures, first failure and run limit."""
    args = (
        "explore",
        ROOT / "tests" / "guests" / "lost_wakeup.S",
        "--vcpus",
        "2",
        "--random",
        "16",
        "--seed",
        "1",
        "--all",
        "--max-insns",
        "200000",
        "--json",
    )
    local, _ = result(emu(env, *args), 1)
    assert local["failures"] > 0 and local["first_failure"]["error"].startswith("hang: --max-insns 200000")
    remote, _ = result(emu(env, *args, "--ray", head), 1)
    assert remote == local
