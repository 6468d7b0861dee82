"""CPU speed and memory work, each piece measured (docs/BENCHMARKS.md): Winograd convolutions,
ReLU fused with max pooling, L-BFGS with preallocated state, heap handling during a run."""
