"""CPU benchmarks (`make bench` = python -m erpd_megatron.bench.run_all) and the GPU check script.

See docs/benchmarks.md for what each measures and the latest figures."""
