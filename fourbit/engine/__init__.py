"""Serving engine: sequences, the paged KV block manager, the continuous-batching scheduler, the runner."""
