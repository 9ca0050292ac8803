"""HF <-> Megatron (erpd dist checkpoint) conversion drivers, streaming tensor by tensor.

import_hf: HF directory -> <out>/latest + <out>/iter_0000000/ (model-only erpd checkpoint, loadable by
  erpd_megatron.megatron.checkpoint at any TP/PP whose vocabulary padding matches --tp) with
  iter_0000000/hf/: config.json, tokenizer files, conversion.json and passthrough/ (vision tower, MTP and a
  tied lm_head copy, stored unchanged as safetensors).
export_mcore: erpd checkpoint (imported or saved by the trainer) -> HF directory (sharded safetensors +
  index, config, tokenizer), loadable by transformers; passthrough tensors copied bit-exactly.
Both write into a temporary sibling directory and rename it at the end.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from . import maps, mcore_io
from .config import ConvConfig, ConversionError
from .hf_io import HFCheckpoint, ShardedWriter, atomic_output_dir, copy_side_files, read_json

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
ITER0 = "iter_0000000"
_DT_NAME = {v: k for k, v in DTYPES.items() if k.startswith(("bf", "fp"))}


def _model_config(hf_config: dict):
    from erpd_megatron.megatron.model import ModelConfig

    try:
        return ModelConfig.from_hf(hf_config)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"config.json: {e}") from e


def check_names(cc: ConvConfig, ck: HFCheckpoint) -> list[str]:
    """Refuse missing / unknown / mis-shaped tensors before writing anything. Returns passthrough names."""
    present = set(ck.names())
    expected: dict[str, tuple[int, ...]] = {}
    for name in maps.mcore_names(cc):
        meta = torch.empty(maps.expected_shape(cc, name), device="meta")
        expected.update({h: tuple(t.shape) for h, t in maps.mcore_to_hf(cc, name, meta)})
    missing = [h for h in expected if h not in present]
    if missing:
        raise ConversionError(f"{ck.path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all) "
                              f"for {cc.architecture}")
    passthrough = [n for n in ck.names() if n not in expected and n.startswith(cc.passthrough_prefixes)]
    if cc.tie_word_embeddings and "lm_head.weight" in present:
        passthrough.append("lm_head.weight")  # tied copy some checkpoints store: keep it as is
    unknown = sorted(present - set(expected) - set(passthrough))
    if unknown:
        raise ConversionError(f"{ck.path}: unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all) "
                              f"for {cc.architecture}")
    for h, shape in expected.items():
        if ck.meta[h][2] != shape:
            raise ConversionError(f"config/weights mismatch: {h} has shape {ck.meta[h][2]}, config.json implies {shape}")
    return passthrough


def import_hf(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, dtype: str | None = None,
              overwrite: bool = False) -> Path:
    from erpd_megatron.megatron.checkpoint import FORMAT_VERSION, LATEST, MARKER

    ck = HFCheckpoint(hf_dir)
    cc = ConvConfig.from_hf(ck.config)
    cc.check_tp(tp)
    if pp < 1 or cc.num_layers % pp:
        raise ConversionError(f"PP={pp} does not divide num_hidden_layers={cc.num_layers}")
    mc = _model_config(ck.config)
    cc = cc.with_padded_vocab(mc.padded_vocab_size(tp))
    passthrough = check_names(cc, ck)
    src_dtypes = {n: str(ck.meta[n][1]).removeprefix("torch.") for n in ck.names()}
    target = DTYPES[dtype] if dtype else None
    if dtype and target is None:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")

    model = mcore_io.meta_model(mc, cc.padded_vocab_size, target or torch.float32)
    if target is None:  # keep each parameter in its source dtype: import -> export is bit-exact
        for name, p in list(model.named_parameters()):
            src = ck.meta[maps.entry(cc, name)[1][0]][1]
            if p.dtype != src:
                mod, attr = _owner(model, name)
                mod._parameters[attr] = torch.nn.Parameter(torch.empty(p.shape, dtype=src, device="meta"),
                                                           requires_grad=p.requires_grad)

    from erpd_megatron.utils.console import progress

    bar = progress(total=sum(1 for _ in model.named_parameters()), desc="import", unit="tensor")

    def full_tensor(name: str) -> torch.Tensor:
        bar.update(1)  # called once per parameter, in writing order (a tensor split in chunks: on its first)
        conv, hf_names = maps.entry(cc, name)
        if conv == "vocab":  # padded while reading: no second copy of the largest tensor
            return ck.get(hf_names[0], pad_rows_to=cc.padded_vocab_size)
        return maps.to_mcore(cc, name, conv, [ck.get(h) for h in hf_names])

    with ck, bar, atomic_output_dir(out_dir, overwrite) as tmp:
        it = tmp / ITER0
        mcore_io.save_lazy(model, str(it), full_tensor)
        hf = it / "hf"
        (hf / "passthrough").mkdir(parents=True)
        (hf / "config.json").write_text(json.dumps(ck.config, indent=2) + "\n")
        copy_side_files(ck.path, hf)
        if passthrough:
            w = ShardedWriter(hf / "passthrough", [(n, ck.meta[n][2], ck.meta[n][1]) for n in passthrough])
            for n in passthrough:
                w.add(n, ck.get(n))
            w.finish()
        conv = {"source": str(Path(hf_dir).resolve()), "architecture": cc.architecture, "tp": tp, "pp": pp,
                "padded_vocab_size": cc.padded_vocab_size, "dtypes": src_dtypes, "passthrough": passthrough}
        (hf / "conversion.json").write_text(json.dumps(conv, indent=1) + "\n")
        marker = {"format_version": FORMAT_VERSION, "step": 0, "trainer_state": {}, "model_cfg": mc.to_dict(),
                  "parallel": {"tp": tp, "pp": pp, "dp": 1, "cp": 1, "sp": False, "vpp": None}, "world_size": 1,
                  "has_optimizer": False, "imported_from": conv["source"], "files": _file_records(it)}
        (it / MARKER).write_text(json.dumps(marker, indent=1, default=str))
        (tmp / LATEST).write_text(ITER0 + "\n")
    log.info("imported %s -> %s (tp=%d pp=%d)", hf_dir, out_dir, tp, pp)
    return Path(out_dir)


def _owner(model, name: str):
    mod_name, _, attr = name.rpartition(".")
    return model.get_submodule(mod_name), attr


def _file_records(root: Path) -> dict[str, dict]:
    """Size and sha256 of every file (the trainer's checkpoint marker format, checked on every load)."""
    from erpd_megatron.utils.digest import digest_files, list_files

    return digest_files(root, list_files(root))


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def without_mtp(hf_config: dict) -> dict:
    """A copy of a Qwen3.5 config.json that declares no multi-token-prediction layer (`mtp_num_hidden_layers` 0 in
    the text config, and at the top level where the config has it there), for an export without `mtp.*`."""
    out = json.loads(json.dumps(hf_config))
    text = out["text_config"] if isinstance(out.get("text_config"), dict) else out
    text["mtp_num_hidden_layers"] = 0
    if "mtp_num_hidden_layers" in out:
        out["mtp_num_hidden_layers"] = 0
    return out


def find_hf_template(ckpt: Path) -> Path | None:
    """The HF side files of a checkpoint: its own hf/ (an imported base), else the imported base of the run dir
    it lives in (<run>/ckpt/<method>/iter_N -> <run>/base/iter_0000000/hf): tokenizer, chat template, generation
    config, source dtypes (conversion.json) and the pass-through tensors (vision tower, MTP) a trainer
    checkpoint does not hold."""
    if (ckpt / "hf" / "config.json").is_file():
        return ckpt / "hf"
    for parent in ckpt.resolve().parents:
        cand = parent / "base" / ITER0 / "hf"
        if (cand / "config.json").is_file():
            return cand
    return None


def generation_config(hf_config: dict) -> dict:
    """A minimal generation_config.json (the template had none): the config's bos / eos / pad token ids."""
    text = hf_config.get("text_config") if isinstance(hf_config.get("text_config"), dict) else hf_config
    out = {k: text.get(k, hf_config.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {k: v for k, v in out.items() if v is not None}


def export_mcore(mcore_dir: str, out_dir: str, dtype: str | None = None, hf_template: str | None = None,
                 overwrite: bool = False, max_shard_bytes: int = 5 * 2**30, drop_mtp: bool = False) -> Path:
    """drop_mtp: leave the `mtp.*` draft head out (and say so in config.json, see without_mtp). Training never
    touches it: after training it is the imported one, which drafts for the original trunk, so MTP speculative
    decoding accepts fewer tokens. By default it is kept (unchanged) and a trained export logs a warning."""
    from erpd_megatron.megatron.checkpoint import CheckpointError, resolve_checkpoint_dir, verify_checkpoint_content
    from erpd_megatron.megatron.model import ModelConfig

    try:
        path = Path(resolve_checkpoint_dir(mcore_dir))
        meta = verify_checkpoint_content(str(path))  # every file's sha256, before any (pickled) metadata is read
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    mc = ModelConfig.from_dict(meta["model_cfg"])
    tp = int((meta.get("parallel") or {}).get("tp", 1))
    tmpl = Path(hf_template) if hf_template else find_hf_template(path)
    if tmpl is None:
        log.warning("export: no HF template found for %s (no hf/ beside it, no run dir base/ above it): writing "
                    "config.json and weights only, no tokenizer or chat template; give --hf-template BASE_DIR", path)
    hf_config = read_json(tmpl / "config.json") if tmpl else mc.to_hf()
    cc = ConvConfig.from_hf(hf_config).with_padded_vocab(mc.padded_vocab_size(tp))
    conv = read_json(tmpl / "conversion.json") if tmpl and (tmpl / "conversion.json").is_file() else {}
    src_dtypes = conv.get("dtypes", {})
    target = DTYPES[dtype] if dtype else None
    stored_dtypes = mcore_io.checkpoint_dtypes(str(path))
    stored = stored_dtypes.get("embedding.word_embeddings.weight", torch.float32)
    model = mcore_io.meta_model(mc, cc.padded_vocab_size, stored)

    def out_dtype(hf_name: str) -> torch.dtype:
        if target is not None:
            return target
        return getattr(torch, src_dtypes[hf_name]) if hf_name in src_dtypes else stored

    names = maps.mcore_names(cc)
    groups: list[list[str]] = []
    for n in names:  # one read per layer (and one for the globals)
        key = _LAYER.match(n).group(1) if _LAYER.match(n) else "g"
        if groups and groups[-1][0] != key:
            groups.append([key])
        if not groups:
            groups.append([key])
        groups[-1].append(n)
    passthrough = HFCheckpoint(tmpl / "passthrough", require_config=False) \
        if tmpl and (tmpl / "passthrough" / "model.safetensors.index.json").is_file() else None
    pass_names = passthrough.names() if passthrough is not None else []
    mtp = [n for n in pass_names if n.startswith("mtp.")]
    if mtp and drop_mtp:
        pass_names = [n for n in pass_names if not n.startswith("mtp.")]
        hf_config = without_mtp(hf_config)
        log.info("export: %d mtp.* tensors left out, config.json says mtp_num_hidden_layers=0", len(mtp))
    elif mtp and int(meta.get("step") or 0) > 0:
        log.warning("export: the %d mtp.* tensors (MTP draft head) are the imported ones, never trained, next to a "
                    "trunk trained for %s steps: MTP speculative decoding will accept fewer draft tokens. "
                    "Export with --drop-mtp to leave them out.", len(mtp), meta.get("step"))
    plan = []  # (HF name, shape, dtype) in writing order: lets the writer stream
    for n in names:
        meta_full = torch.empty(maps.expected_shape(cc, n), device="meta")
        plan += [(h, tuple(t.shape), out_dtype(h)) for h, t in maps.mcore_to_hf(cc, n, meta_full)]
    plan += [(n, passthrough.meta[n][2], passthrough.meta[n][1]) for n in pass_names]
    with atomic_output_dir(out_dir, overwrite) as tmp:
        from erpd_megatron.utils.console import progress

        w = ShardedWriter(tmp, plan, max_shard_bytes)
        for _key, *group in progress(groups, desc="export", unit="layer"):
            tensors = mcore_io.load_params(model, str(path), group, stored_dtypes)
            for n in group:
                for h, t in maps.mcore_to_hf(cc, n, tensors.pop(n)):
                    w.add(h, t.to(out_dtype(h)))
            del tensors
            mcore_io.release_memory()
        if passthrough is not None:
            with passthrough:
                for n in pass_names:
                    w.add(n, passthrough.get(n))
        w.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tmpl:
            copy_side_files(tmpl, tmp)
        if not (tmp / "generation_config.json").is_file():  # eos / pad for generate(), from the config
            (tmp / "generation_config.json").write_text(json.dumps(generation_config(hf_config), indent=2) + "\n")
    log.info("exported %s -> %s", path, out_dir)
    return Path(out_dir)

