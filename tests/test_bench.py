"""bench.py: the decode step's roofline, the bar its measured steps are put against, by hand."""

import torch

import bench


def test_the_roofline_reads_every_weight_and_the_cache_once_or_computes_at_peak(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "test", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                   rope_theta=1e6))
    per_layer = 64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128                # q, o, k, v; gate, up, down
    params = 2 * per_layer + 151936 * 64                                  # and the LM head
    kv = 8 * 2 * 2 * 2 * 100 * 16                                         # rows, layers, k and v, heads, slots, dim
    memory = (params + kv) * 2 / 1e12                                     # bf16 at 1 TB/s
    assert bench.roofline("test", 100, torch.bfloat16, 1e12, 1e18, rows=8) == memory   # bound by memory
    flops = 2 * params * 8 + 8 * 2 * 4 * 4 * 100 * 16                     # the matmuls, attention's q k and p v
    assert bench.roofline("test", 100, torch.bfloat16, 1e18, 1e9, rows=8) == flops / 1e9   # bound by arithmetic
