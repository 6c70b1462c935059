"""Paged attention kernels over the per-layer cache layout [num_blocks, block_size, kv_heads, head_dim]."""
