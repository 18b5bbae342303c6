"""Test helper: `accelerate launch --config_file <FSDP2 config, use_cpu: true> tests/e2e/fsdp2_on_cpu.py --cfg ...`
runs `hcpdiff.train_ac` under accelerate's FSDP2 on CPU processes.

accelerate selects FSDP only for a GPU-like process group (accelerate/state.py, AcceleratorState.__init__: the branch
`distributed_type in [MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON]` that sets DistributedType.FSDP has no MULTI_CPU), so
on a machine without a GPU the same launch would train plain DDP, which the trainer refuses. This sets up accelerate's
process state as the trainer would on a CPU (gloo, cpu device) and labels the group as a multi-device one, so the
trainer's Accelerator takes FSDP2 from the launcher's config. Everything after that is the real thing: accelerate's
FSDP2 `prepare` (torch's `fully_shard` over gloo), its clipping and no-sync accumulation, the trainer's gathering.
"""
from accelerate.state import PartialState
from accelerate.utils import DistributedType

from hcpdiff.cli import run_cli
from hcpdiff.train_ac import cli

if __name__ == "__main__":
    state = PartialState(cpu=True)
    assert state.distributed_type == DistributedType.MULTI_CPU and state.backend == "gloo", state
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    run_cli(cli)
