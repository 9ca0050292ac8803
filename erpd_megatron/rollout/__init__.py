"""Rollout engines (generation only) and the Megatron -> engine weight stream.

- ``engine``: the interface (``RolloutEngine``, ``SamplingParams``, ``Sample``).
- ``local_engine``: ``LocalEngine``, transformers in-process (CPU default, tests, demo).
- ``sglang_engine``: ``SGLangEngine``, HTTP client of ``sglang.launch_server`` processes.
- ``weight_sync``: HF-named full-tensor buckets streamed out of a Megatron model.
- ``eval``: AVG@K / pass@K over a JSONL benchmark (``erpd eval``).

Nothing heavy is imported here; import the submodule you need.
"""
