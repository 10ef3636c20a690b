"""Sharded parameters (FSDP2) take the per-sublayer path and give the unsharded model's loss and gradients.

The two-phase computation reads later layers' pseudo-queries from the model's forward; under FSDP2 those are
sharded DTensors until their own layer runs, so the model must notice and let each sublayer read its own.
Runs FSDP2 on CPU (gloo, one process) in a subprocess, against the same model unsharded.
"""

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    from torch.distributed.fsdp import fully_shard
    from _tiny import tiny_attnres, token_ids
    reference = tiny_attnres("block", num_hidden_layers=4, attn_res_block_size=4).train()
    model = tiny_attnres("block", num_hidden_layers=4, attn_res_block_size=4).train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ids = token_ids(seq=80)  # above the decoding size, so the two-phase path would be taken
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-6, (loss.item(), ref_loss.item())
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    worst = max((grads[n] - p.grad).abs().max().item() for n, p in reference.named_parameters())
    assert worst < 1e-5, worst
    print("ok", worst)
    dist.destroy_process_group()
""")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_fsdp2_sharded_model_matches_unsharded(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(Path(__file__).parent), str(port)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr[-3000:]
