"""The continuous-batching engine: scheduling, paged KV blocks, sampling and detokenization."""
