"""Rollout engines (generation only) and the Megatron -> engine weight stream.

- ``engine``: the interface (``RolloutEngine``, ``SamplingParams``, ``Sample``).
- ``local_engine``: ``LocalEngine``, transformers in-process (CPU default, tests, demo).
- ``sglang_engine``: ``SGLangEngine``, HTTP client of ``sglang.launch_server`` processes; its parts:
  ``sglang_launch`` (command line, process group), ``sglang_http`` (one call, the retry helper,
  request / response shapes), ``sglang_weights`` (update session, transports), ``sglang_wire``
  (payload bytes).
- ``weight_sync``: HF-named full-tensor buckets streamed out of a Megatron model.
- ``eval``: AVG@K / pass@K over a JSONL benchmark (``erpd eval``).

Nothing heavy is imported here; import the submodule you need.
"""
