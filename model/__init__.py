"""The Dots1 forward pass: modules, paged KV cache and checkpoint loading. Pure compute: no requests, no HTTP."""
