"""The benchmark suite: ``python -m bench`` (``make bench``) and ``python -m bench --quick``.

Writes ``bench-results/BENCHMARKS.md`` (tables, the machine, the commit, the targets met or not) and a
JSON file of the raw figures; ``docs/benchmarks.md`` keeps the current table of each topic. Modules: :mod:`bench.models` (cached models), :mod:`bench.inprocess` (the
handler in this process), :mod:`bench.served` (multi-model-server on the host and in Docker),
:mod:`bench.sequence_encoder` (the serving sequence encoder, ONNX Runtime, vs PyTorch),
:mod:`bench.sequence_training` (the sequence model's loss and optimiser step, before and after),
:mod:`bench.allocator` (serving's allocator setting against glibc's defaults), :mod:`bench.stats`
(percentiles), :mod:`bench.report` (machine, targets, Markdown).
"""
