"""Reading the launch environment (torchrun, SLURM) and the distributed config: no processes started."""

from __future__ import annotations

import pytest
import torch

from evamim.config import ConfigError, load_config
from evamim.engine.distributed import (
    DistributedConfig,
    DistributedEnvError,
    LaunchEnv,
    init_distributed,
    parse_first_host,
    read_launch_env,
    select_device,
    slurm_default_port,
)
from evamim.tasks.pretrain import PretrainConfig, validate

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}
SLURM = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5",
         "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[017-018]",
         "SLURM_STEP_TASKS_PER_NODE": "8(x2)"}
ALL_KEYS = sorted(set(TORCHRUN) | set(SLURM) | {"SLURM_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NTASKS_PER_NODE"})


@pytest.fixture
def clean_env(monkeypatch):
    for key in ALL_KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_torchrun_variables_give_rank_world_local_rank_and_master(clean_env):
    for key, value in TORCHRUN.items():
        clean_env.setenv(key, value)
    assert read_launch_env() == LaunchEnv("torchrun", rank=3, world_size=8, local_rank=1, local_world_size=2,
                                          master_addr="node7", master_port=29400)


def test_no_launcher_means_one_process(clean_env):
    env = read_launch_env()
    assert (env.launcher, env.rank, env.world_size, env.distributed) == ("none", 0, 1, False)
    assert read_launch_env({"RANK": "0", "WORLD_SIZE": "1"}).world_size == 1  # torchrun --nproc-per-node 1


@pytest.mark.parametrize(
    "drop, message",
    [
        (("WORLD_SIZE",), "RANK=3, LOCAL_RANK=1 are set but WORLD_SIZE is not"),
        (("RANK",), "but RANK is not"),
        (("RANK", "WORLD_SIZE"), "LOCAL_RANK=1 is set but RANK and WORLD_SIZE are not"),
        (("LOCAL_RANK",), "LOCAL_RANK is not set"),
        (("MASTER_PORT",), "MASTER_PORT not"),
    ],
)
def test_a_half_set_torchrun_environment_is_an_error_not_one_process(drop, message):
    env = {key: value for key, value in TORCHRUN.items() if key not in drop}
    with pytest.raises(DistributedEnvError, match=message) as error:
        read_launch_env(env)
    assert "torchrun" in str(error.value)  # the message says how to launch


@pytest.mark.parametrize("override, message", [({"RANK": "x"}, "RANK='x' is not an integer"),
                                               ({"RANK": "8"}, "rank 8 is outside"),
                                               ({"WORLD_SIZE": "0"}, "world size must be >= 1")])
def test_inconsistent_torchrun_values_are_errors(override, message):
    with pytest.raises(DistributedEnvError, match=message):
        read_launch_env({**TORCHRUN, **override})


def test_slurm_variables_map_to_rank_world_local_rank_and_the_first_node(clean_env):
    for key, value in SLURM.items():
        clean_env.setenv(key, value)
    env = read_launch_env(use_scontrol=False)
    assert env == LaunchEnv("slurm", rank=13, world_size=16, local_rank=5, local_world_size=8,
                            master_addr="gpu017", master_port=29500 + 4242 % 1000)
    clean_env.setenv("MASTER_PORT", "12345")
    clean_env.setenv("MASTER_ADDR", "10.0.0.1")
    env = read_launch_env(use_scontrol=False)
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 12345)


def test_torchrun_inside_a_slurm_job_wins_over_slurm():
    assert read_launch_env({**SLURM, **TORCHRUN}).launcher == "torchrun"


def test_slurm_allocation_without_srun_runs_one_process_and_says_so(caplog):
    env = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu1"})
    assert env.world_size == 1 and "not started by srun" in caplog.text


def test_half_set_slurm_environment_is_an_error():
    with pytest.raises(DistributedEnvError, match="SLURM_LOCALID is not set"):
        read_launch_env({k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}, use_scontrol=False)
    with pytest.raises(DistributedEnvError, match="no node list"):
        read_launch_env({k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}, use_scontrol=False)


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[017-018]", "gpu017"), ("node[3,5-7],login1", "node3"), ("a[1-2]-ib[03-04]", "a1-ib03"),
    ("host1,host2", "host1"), ("dgx-a100-042", "dgx-a100-042"),
])
def test_parse_first_host_of_a_slurm_node_list(nodelist, first):
    assert parse_first_host(nodelist) == first


def test_unreadable_node_list_asks_for_master_addr():
    with pytest.raises(DistributedEnvError, match="set MASTER_ADDR"):
        parse_first_host("gpu[01-02")


def test_default_slurm_port_is_derived_from_the_job_id():
    assert slurm_default_port("1234567") == 29500 + 567 and slurm_default_port(None) == 29500


def test_one_process_needs_no_process_group_and_cpu_is_chosen_without_cuda():
    state = init_distributed(DistributedConfig(), "cpu", environ={})
    assert (state.world_size, state.owns_group, state.device) == (1, False, torch.device("cpu"))
    if not torch.cuda.is_available():
        assert select_device("auto", LaunchEnv("none")) == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            select_device("cuda", LaunchEnv("none"))
    with pytest.raises(ValueError, match="is not a device"):
        select_device("gpu0", LaunchEnv("none"))


@pytest.mark.parametrize("override, message", [
    ("distributed.strategy=zero3", "distributed.strategy must be one of ddp, zero1, fsdp"),
    ("distributed.timeout_minutes=0", "timeout_minutes must be > 0"),
    ("distributed.teacher=shard", "distributed.teacher must be 'replicate'"),
    ("distributed.fsdp.param_dtype=fp8", "distributed.fsdp.param_dtype must be null or one of"),
])
def test_bad_distributed_config_is_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(PretrainConfig, None, [override]))


def test_fsdp_refuses_fp16_loss_scaling():
    config = load_config(PretrainConfig, None, ["distributed.strategy=fsdp", "loop.precision=fp16"])
    with pytest.raises(ConfigError, match="use loop.precision=bf16"):
        validate(config)
