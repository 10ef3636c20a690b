"""2 processes under `accelerate launch` give the per-step losses of 1 process with twice the accumulation.

`accelerate launch --cpu --num_processes N` (accelerate 1.15) starts N processes only through MPI, with
`--mpirun_hostfile`; without it, it starts one. Its torchrun launcher (examples/accelerate/cpu_2proc.yaml) on a
machine with no GPU gives N CPU processes with gloo (MULTI_CPU), which is what this test launches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from test_training_helpers import load_weights, make_attnres_dir, make_text_dir, reset_accelerate

from hf_attnres.training import train
from hf_attnres.training.metrics import read_metrics

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
COMMON = ["--seq-len", "32", "--batch-size", "2", "--max-steps", "4", "--lr", "3e-3", "--attnres-lr", "3e-2",
          "--warmup-steps", "1", "--validation-fraction", "0.2", "--max-eval-blocks", "4", "--eval-every", "2",
          "--save-every", "0", "--no-progress", "--report-to", "none", "--cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_args() -> list[str]:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the torchrun launcher would use it")
    return ["--config_file", str(EXAMPLES / "cpu_2proc.yaml"), "--main_process_port", str(_free_port())]


def test_two_processes_match_one_process_with_double_accumulation(tmp_path):
    model = make_attnres_dir(tmp_path / "model")
    data = make_text_dir(tmp_path / "data", n_docs=10, chars=700)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *_launch_args(), "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "hf_attnres.cli", "train", str(model), "--output-dir", str(two), "--data", str(data),
           "--grad-accum", "1", *COMMON]
    # a clean environment: no distributed/Accelerate variables left by in-process runs of earlier tests
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ACCELERATE_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    log = tmp_path / "launch.log"
    with open(log, "w") as out:  # a file, not a pipe: nothing can block on a full pipe
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                              timeout=280)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "on 2 process(es)" in text

    reset_accelerate()
    from hf_attnres.cli import parse_config

    one = train(parse_config(["train", str(model), "--output-dir", str(tmp_path / "one"), "--data", str(data),
                              "--grad-accum", "2", *COMMON]))
    reset_accelerate()

    loss_two = [r["loss"] for r in read_metrics(two / "metrics.jsonl", "train")]
    loss_one = [r["loss"] for r in read_metrics(one.metrics_file, "train")]
    assert len(loss_two) == len(loss_one) == 4
    assert loss_two == pytest.approx(loss_one, abs=1e-5)
    assert loss_one[-1] < loss_one[0]
    eval_two = [r["loss"] for r in read_metrics(two / "metrics.jsonl", "eval")]
    eval_one = [r["loss"] for r in read_metrics(one.metrics_file, "eval")]
    assert eval_two == pytest.approx(eval_one, abs=1e-5)
    a, b = load_weights(two / "final"), load_weights(one.final_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_example_accelerate_configs_load_and_wrap_the_attnres_layer():
    from accelerate.commands.config.config_args import load_config_from_file

    from hf_attnres.modeling import AttnResDecoderLayer

    kinds = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.stem] = config.distributed_type.value
        if config.fsdp_config:
            assert config.fsdp_config["fsdp_version"] == 2
            assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == AttnResDecoderLayer.__name__
        if config.deepspeed_config:  # must follow --grad-accum (the trainer refuses a mismatch)
            assert "gradient_accumulation_steps" not in config.deepspeed_config
    assert {"single_gpu", "ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3", "multi_node_fsdp2"} <= set(kinds)
