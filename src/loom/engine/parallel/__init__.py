"""Tensor parallelism for serving (Megatron-LM style, on torch.distributed): one engine on rank 0, the model and
KV cache cut across N ranks (models/tensor_parallel.py, layers/parallel.py).

    world.py    the process group: ranks spawned by loom on this machine, or started by torchrun anywhere
    channel.py  rank 0's commands (each step's metadata broadcast), the heartbeat, failure detection
    worker.py   what every rank executes, and the workers' loop
    engine.py   ParallelEngine: LLMEngine on rank 0 over its shard, every forward a command
    launch.py   ``start_parallel``: what LLM calls (validate, load, join, cut; other ranks serve and exit)
"""
