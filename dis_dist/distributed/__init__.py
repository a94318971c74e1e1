"""How the model is spread over processes: the training strategies and what they share.

- ``env``: where this process runs (rank, world size, device) and the job's process group.
- ``strategy``: the ``Strategy`` interface the trainer calls, and what strategies share.
- ``registry``: the strategies by name (``build_strategy`` for ``dist.strategy``).
- ``single``, ``ddp``, ``fsdp``, ``zero``: the strategies (one process; DistributedDataParallel;
  FSDP2 / HSDP; DeepSpeed ZeRO 1-3).
- ``init``: meta-device initialisation, the same initial weights at any world size.
"""
