"""Test-only, on the PYTHONPATH of the processes a test launches: lets accelerate run FSDP on CPU processes.

accelerate turns an FSDP config into DistributedType.FSDP only for GPU-like devices (``AcceleratorState`` promotes
MULTI_GPU, MULTI_NPU, ... but never MULTI_CPU), while torch's FSDP2 (``fully_shard``) runs on CPU processes with
gloo. With ``UPCYCLE_TEST_FSDP_ON_CPU=1`` this promotes MULTI_CPU to FSDP when accelerate was given an FSDP plugin,
so the sharded training, checkpoint and resume paths run here as they would on GPUs.
"""

import os

if os.environ.get("UPCYCLE_TEST_FSDP_ON_CPU") == "1":
    from accelerate import state as _state

    _original_init = _state.AcceleratorState.__init__

    def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == _state.DistributedType.MULTI_CPU:
            # PartialState's shared state too: every later AcceleratorState() copies it
            _state.PartialState._shared_state["distributed_type"] = _state.DistributedType.FSDP
            self.distributed_type = _state.DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    _state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
