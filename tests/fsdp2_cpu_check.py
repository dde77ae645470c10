"""Launched by tests/test_distributed.py under `accelerate launch` (2 CPU processes): torch's FSDP2
(`fully_shard`) on gloo shards a small network and, with each rank's loss multiplied by the world
size (FSDP *averages* gradients), reproduces the one-process gradient of the global batch."""

import torch
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard

acc = Accelerator()
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
ref.load_state_dict(net.state_dict())
for layer in (net[0], net[2]):
    fully_shard(layer)
fully_shard(net)
x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
k = len(x) // acc.num_processes
mine = x[acc.process_index * k : (acc.process_index + 1) * k]
(net(mine).pow(2).sum() / len(x) * acc.num_processes).backward()
ref(x).pow(2).sum().div(len(x)).backward()
pairs = zip(net.parameters(), ref.parameters(), strict=True)
diff = max(float((p.grad.full_tensor() - q.grad).abs().max()) for p, q in pairs)
print(f"rank {acc.process_index}: sharded={type(net[0].weight).__name__} max_grad_diff={diff:.3g}", flush=True)
assert diff < 1e-6
acc.wait_for_everyone()
torch.distributed.destroy_process_group()  # a clean gloo shutdown (else an abort at exit is possible)
