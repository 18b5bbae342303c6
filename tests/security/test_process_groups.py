"""No process outlives its run: the trainer destroys the process group on every exit path, and a test that times
out kills its launcher's whole process group (a hung torchrun worker was once left behind as an orphan)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from hcpdiff.tools.make_demo_data import make_demo_data


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_timeout_kills_the_whole_process_group(tmp_path, cli):
    """A launcher whose worker hangs: on timeout the worker dies with it, not left as an orphan."""
    script = "sleep 300 & echo $! > worker.pid; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        cli(["bash", "-c", script], cwd=tmp_path, timeout=3)
    worker = int((tmp_path / "worker.pid").read_text())
    deadline = time.time() + 10
    while pid_alive(worker) and time.time() < deadline:  # SIGKILL is delivered at once; the reaping may lag
        time.sleep(0.1)
    assert not pid_alive(worker)


def test_free_ports_differ_and_are_bindable(free_port):
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536


FAILING_RUN = textwrap.dedent('''
    import sys
    import torch.distributed as dist
    from hcpdiff.config import load_config
    from hcpdiff.errors import HcpError
    from hcpdiff.train.run import run_training

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = load_config(sys.argv[1], sys.argv[2:])
    try:
        run_training(cfg, single_process=True)
    except HcpError as err:
        print("failed:", err)
    print("process group alive after the run:", dist.is_initialized())
''')


@pytest.mark.e2e
def test_a_run_that_fails_still_destroys_the_process_group(workdir, tiny_model, cli):
    data = make_demo_data(workdir / "data", num=2)
    (workdir / "failing_run.py").write_text(FAILING_RUN)
    result = cli([sys.executable, "failing_run.py", "cfgs/train/examples/demo_tiny.yaml",
                  f"model.pretrained_model_name_or_path={workdir / 'no_model'}",
                  f"data.dataset1.source.data_source1.img_root={data}", "exp_dir=exps/run"], cwd=workdir, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed:" in result.stdout and "no_model" in result.stdout
    assert "process group alive after the run: False" in result.stdout
    assert not (workdir / "exps/run").exists()
