"""Distributed LoRA training (task type ``lora_training``).

The origin splits a dataset into contiguous shards, one per selected node, and
drives synchronous rounds: each node trains ``sync_every`` optimizer steps of its
shard starting from the current global adapter and answers with its adapter; the
origin averages them weighted by the samples each processed (FedAvg) and starts the
next round from the average. The final adapter is stored as safetensors under an id
that is the hash of its bytes, announced in heartbeats, fetched on demand by nodes
that serve inference with it, and anchored on chain.

- ``spec``: settings, datasets, shards and the step schedule (no torch);
- ``lora``: the PEFT trainer, FedAvg, adapter bytes and merging (torch, peft);
- ``wire``: the ``/vcoin/train/1.0.0`` records;
- ``adapters``: the node's adapter store;
- ``host``: a node's side of a training task;
- ``run``: the origin's side.
"""
