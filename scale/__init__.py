"""Scale: FSDP2 sharding and mixed precision (parallel), atomic checkpoints and exact resume (checkpoint), and
the memory plan (memory). None of it is the method; all of it lets the same method run on many GPUs."""
