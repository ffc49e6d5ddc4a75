"""A torchrun worker of `mllm train ...` ends through `exit_distributed_worker`: the summary printed and flushed,
the exit code kept, and no interpreter finalization (where gloo's worker threads, still alive behind DeepSpeed's
references, can abort the process after a finished run: see `mllm.cli.train_sft.exit_distributed_worker`)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.train.test_ddp import free_port

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import atexit, os, sys
    from types import SimpleNamespace
    import torch, torch.distributed as dist
    from mllm.cli.train_sft import run_training
    from mllm.train.trainer import RunMismatchError

    def train(model_args, data_args, training_args):
        dist.init_process_group("gloo")
        gathered = torch.zeros(dist.get_world_size())
        dist.all_gather_into_tensor(gathered, torch.ones(1) * dist.get_rank(), async_op=True).wait()
        if sys.argv[1] == "mismatch":
            raise RunMismatchError("out/ holds another run")
        return {"model_dir": "out", "gathered": gathered.tolist()}

    atexit.register(lambda: print("FINALIZED", flush=True))
    arguments = (SimpleNamespace(tune_vision=True), None, SimpleNamespace(process_index=int(os.environ["RANK"])))
    code = run_training("train test", train, arguments, ("model_dir", "gathered"))
    print("RETURNED", code, flush=True)
    sys.exit(code)
""")


def run_workers(tmp_path, mode):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_finished_worker_exits_with_its_summary_and_without_finalization(tmp_path):
    proc = run_workers(tmp_path, "ok")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"gathered": [\n    0.0,\n    1.0\n  ]' in proc.stdout  # rank 0's summary, flushed before the exit
    assert proc.stdout.count('"model_dir"') == 1  # only rank 0 prints it
    assert "FINALIZED" not in proc.stdout and "RETURNED" not in proc.stdout


def test_a_refused_run_keeps_its_exit_code(tmp_path):
    proc = run_workers(tmp_path, "mismatch")
    assert proc.returncode != 0
    assert proc.stderr.count("mllm train test: out/ holds another run") == 2  # each worker's message, flushed
    assert "exitcode  : 2" in proc.stderr and "FINALIZED" not in proc.stdout
