"""Launch-environment detection (launch/env.py): pure functions, no processes started."""
from __future__ import annotations

import os
import socket

import pytest
import torch

from polytron.launch.env import (
    PORT_BASE,
    PORT_SPAN,
    LaunchEnv,
    LaunchError,
    _first_host_python,
    check_master_reachable,
    choose_backend,
    detect_launch_env,
    export_env,
    first_host,
    tasks_on_node,
)

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
SRUN = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_JOB_ID": "12345"}


def test_torchrun_env_wins_over_slurm():
    e = detect_launch_env({**SRUN, **TORCHRUN})
    assert e == LaunchEnv(3, 1, 4, 2, "node1", 29500, "torchrun")


def test_srun_env_ranks_master_and_job_port():
    e = detect_launch_env(SRUN)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size) == (3, 1, 4, 2)
    assert e.master_addr == "gpu007" and e.source == "srun"
    assert e.master_port == PORT_BASE + 12345 % PORT_SPAN
    assert detect_launch_env({**SRUN, "MASTER_PORT": "2222"}).master_port == 2222


def test_batch_script_without_step_is_single_process():
    batch = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
    e = detect_launch_env(batch)
    assert (e.source, e.rank, e.world_size, e.master_addr) == ("single", 0, 1, "127.0.0.1")
    assert 0 < e.master_port < 65536


def test_bad_values_name_the_variable():
    with pytest.raises(LaunchError, match="WORLD_SIZE='four'"):
        detect_launch_env({**TORCHRUN, "WORLD_SIZE": "four"})
    with pytest.raises(LaunchError, match="rank 5 .* outside world size 4"):
        detect_launch_env({**TORCHRUN, "RANK": "5"})
    with pytest.raises(LaunchError, match="MASTER_PORT=70000"):
        detect_launch_env({**TORCHRUN, "MASTER_PORT": "70000"})


def test_hostlists_and_tasks_per_node():
    assert _first_host_python("gpu[007-009,012],cpu1") == "gpu007"
    assert _first_host_python("login1,login2") == "login1"
    assert _first_host_python("n[3]") == "n3"
    assert first_host("solo") == "solo"
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    with pytest.raises(LaunchError, match="tasks per node"):
        tasks_on_node("two", 0)


def test_export_env_round_trips(monkeypatch):
    for k in TORCHRUN:
        # setenv first so monkeypatch restores the variable's absence afterwards;
        # export_env writes os.environ directly and must not leak into later tests.
        monkeypatch.setenv(k, "unset")
        monkeypatch.delenv(k)
    e = LaunchEnv(1, 0, 2, 1, "10.0.0.1", 23456, "srun")
    export_env(e)
    assert {k: os.environ[k] for k in TORCHRUN} == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"}
    assert detect_launch_env() == LaunchEnv(1, 0, 2, 1, "10.0.0.1", 23456, "torchrun")


def test_choose_backend():
    gpu = torch.cuda.is_available()
    assert choose_backend("auto") == ("nccl" if gpu else "gloo")
    assert choose_backend("GLOO") == "gloo"
    with pytest.raises(LaunchError, match="not one of auto, nccl, gloo"):
        choose_backend("mpi")
    if not gpu:
        with pytest.raises(LaunchError, match="'nccl' was requested but no CUDA GPU"):
            choose_backend("nccl")


def test_master_reachable_when_listening_or_refusing():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        check_master_reachable(LaunchEnv(1, 1, 2, 2, "127.0.0.1", port, "torchrun"))
    # Nothing listens any more: refused still proves the host answers.
    check_master_reachable(LaunchEnv(1, 1, 2, 2, "127.0.0.1", port, "torchrun"))
    # Rank 0 and single processes never check.
    check_master_reachable(LaunchEnv(0, 0, 2, 2, "no-such-host.invalid", 1, "torchrun"))


def test_unresolvable_master_is_a_clear_error():
    with pytest.raises(LaunchError, match="cannot resolve master address no-such-host.invalid:29500"):
        check_master_reachable(LaunchEnv(1, 1, 2, 2, "no-such-host.invalid", 29500, "srun"))


def test_unreachable_master_is_a_clear_error():
    addr = "2001:db8::1"  # documentation prefix: normally no route
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.settimeout(1)
            s.connect((addr, 29500))
        pytest.skip("this host routes the IPv6 documentation prefix; cannot test unreachability")
    except ConnectionRefusedError:
        pytest.skip("this host answers for the IPv6 documentation prefix")
    except OSError:
        pass
    with pytest.raises(LaunchError, match=r"cannot reach master address 2001:db8::1:29500 within 1 s"):
        check_master_reachable(LaunchEnv(1, 1, 2, 2, addr, 29500, "srun"), timeout_s=1)
