"""Load Mamba-1 checkpoints from Hugging Face and mamba-ssm into the project's Mamba LM.

Two layouts are read, both the standard wiring (``RMSNorm -> mixer ->
residual`` per layer, RMSNorm before a head tied to the embedding):

- a Hugging Face ``MambaForCausalLM`` folder: ``config.json`` with
  ``model_type: "mamba"`` and ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``, or ``pytorch_model.bin``), weights named
  ``backbone.embeddings / backbone.layers.i.{norm,mixer.*} / backbone.norm_f``;
- mamba-ssm's ``MambaLMHeadModel`` folder: ``config.json`` with ``d_model``,
  ``n_layer``, ``ssm_cfg``, ... and ``pytorch_model.bin``, weights named
  ``backbone.embedding / backbone.layers.i.{norm,mixer.*} / backbone.norm_f``.

The mixer's parameter names are mamba-ssm's in all three (see
:mod:`gam.layers.mamba`), so only the shell is renamed. The model has no
position embedding (``pos_embedding="none"``), as Mamba. Options the project's
Mamba does not have (biases on the projections, no conv bias, another
activation, a dt rank other than ``ceil(d_model / 16)``, an untied head, an
RMSNorm eps other than 1e-5, Mamba-2 or attention layers) are refused with a
one-line error. ``residual_in_fp32`` is not an option here: the residual
stream is kept in the parameters' dtype (fp32 unless you cast the model).

Command line: writes a checkpoint folder (weights, config, tokenizer, and a manifest of
every file's sha256, as the trainer's checkpoints) that ``gam verify``, ``gam generate``,
``gam export``, ``gam eval --data ...`` and :func:`gam.checkpoint.load_checkpoint` read. The
tokenizer is the source's ``tokenizer.json``, or the one ``--tokenizer`` names (mamba-ssm's
checkpoints ship none: they use EleutherAI/gpt-neox-20b's)::

    python -m gam.models.mamba_convert path/to/mamba-130m-hf runs/mamba-130m
    python -m gam.models.mamba_convert path/to/mamba-130m runs/mamba-130m --tokenizer path/to/tokenizer.json
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

from gam.checkpoint import FORMAT_VERSION, TEMP_PREFIX, write_manifest
from gam.config import GAMConfig
from gam.fileio import apply_umask, make_temp_dir
from gam.layers.mamba_block import RMS_NORM_EPS
from gam.models.lm import DecoderLM

__all__ = ["read_mamba_checkpoint", "load_mamba_checkpoint", "convert_mamba_checkpoint"]



def _error(folder: Path, message: str) -> ValueError:
    return ValueError(f"{folder}: {message}")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise _error(folder, "not a folder (a Mamba checkpoint is a folder with config.json and weights)")
    if not path.is_file():
        raise _error(folder, "not a Mamba checkpoint folder (no config.json)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise _error(folder, f"config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise _error(folder, "config.json does not hold an object")
    return config


def _hf_config(folder: Path, cfg: dict) -> tuple[dict, str]:
    """GAMConfig fields of a Hugging Face MambaConfig, and the embedding's key."""
    hidden = cfg.get("hidden_size", 768)
    expand = cfg.get("expand", 2)
    checks = [
        (not cfg.get("use_bias", False), "use_bias=true (biases on in_proj/out_proj)"),
        (cfg.get("use_conv_bias", True), "use_conv_bias=false"),
        (cfg.get("hidden_act", "silu") == "silu", f"hidden_act={cfg.get('hidden_act')!r} (only silu)"),
        (cfg.get("layer_norm_epsilon", RMS_NORM_EPS) == RMS_NORM_EPS,
         f"layer_norm_epsilon={cfg.get('layer_norm_epsilon')} (only {RMS_NORM_EPS})"),
        (isinstance(expand, int), f"expand={expand!r} (only an integer)"),
        (cfg.get("intermediate_size", expand * hidden) == expand * hidden,
         f"intermediate_size={cfg.get('intermediate_size')} != expand * hidden_size"),
        (cfg.get("time_step_rank", "auto") in ("auto", math.ceil(hidden / 16)),
         f"time_step_rank={cfg.get('time_step_rank')} (only ceil(hidden_size / 16) = {math.ceil(hidden / 16)})"),
    ]
    bad = [what for ok, what in checks if not ok]
    if bad:
        raise _error(folder, f"unsupported Mamba option(s): {', '.join(bad)}")
    fields = dict(n_embd=hidden, n_layer=cfg.get("num_hidden_layers", 32), d_state=cfg.get("state_size", 16),
                  d_conv=cfg.get("conv_kernel", 4), expand=expand)
    return fields, "backbone.embeddings.weight"


def _mamba_ssm_config(folder: Path, cfg: dict) -> tuple[dict, str]:
    """GAMConfig fields of a mamba-ssm MambaConfig, and the embedding's key."""
    ssm = cfg.get("ssm_cfg") or {}
    d_model = cfg["d_model"]
    checks = [
        (ssm.get("layer", "Mamba1") == "Mamba1", f"ssm_cfg.layer={ssm.get('layer')!r} (only Mamba1)"),
        (not cfg.get("d_intermediate", 0), "d_intermediate > 0 (an MLP after each mixer)"),
        (not cfg.get("attn_layer_idx"), "attn_layer_idx (attention layers)"),
        (cfg.get("rms_norm", True), "rms_norm=false (LayerNorm)"),
        (cfg.get("tie_embeddings", True), "tie_embeddings=false (an untied head)"),
        (not ssm.get("bias", False), "ssm_cfg.bias=true (biases on in_proj/out_proj)"),
        (ssm.get("conv_bias", True), "ssm_cfg.conv_bias=false"),
        (ssm.get("dt_rank", "auto") in ("auto", math.ceil(d_model / 16)),
         f"ssm_cfg.dt_rank={ssm.get('dt_rank')} (only ceil(d_model / 16))"),
        (isinstance(ssm.get("expand", 2), int), f"ssm_cfg.expand={ssm.get('expand')!r} (only an integer)"),
    ]
    bad = [what for ok, what in checks if not ok]
    if bad:
        raise _error(folder, f"unsupported Mamba option(s): {', '.join(bad)}")
    fields = dict(n_embd=d_model, n_layer=cfg["n_layer"], d_state=ssm.get("d_state", 16),
                  d_conv=ssm.get("d_conv", 4), expand=ssm.get("expand", 2))
    return fields, "backbone.embedding.weight"


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise _error(folder, "no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def read_mamba_checkpoint(folder: str | Path) -> tuple[GAMConfig, dict[str, torch.Tensor]]:
    """The project's config and state dict (our parameter names) for a Hugging
    Face or mamba-ssm Mamba-1 checkpoint folder."""
    folder = Path(folder)
    cfg = _read_config(folder)
    if cfg.get("model_type") == "mamba":
        fields, embedding_key = _hf_config(folder, cfg)
    elif "model_type" in cfg:
        raise _error(folder, f"not a Mamba-1 checkpoint (model_type {cfg['model_type']!r}; "
                      "this converter reads model_type 'mamba' and mamba-ssm's MambaLMHeadModel)")
    elif {"d_model", "n_layer"} <= set(cfg):
        fields, embedding_key = _mamba_ssm_config(folder, cfg)
    else:
        raise _error(folder, "not a Mamba checkpoint (config.json has neither model_type 'mamba' "
                      "nor mamba-ssm's d_model / n_layer)")

    source = _read_weights(folder)
    head = source.get("lm_head.weight")
    embedding = source.get(embedding_key, head)  # a tied pair may be stored once, under either name
    if embedding is None:
        raise _error(folder, f"the weights have no {embedding_key} (not a Mamba language model?)")
    if head is not None and not torch.equal(head, embedding):
        raise _error(folder, "unsupported Mamba option: an untied lm_head (the project's head is the embedding)")
    state = {"token_embedding.weight": embedding}
    for key, value in source.items():
        if key in (embedding_key, "lm_head.weight"):
            continue
        if key == "backbone.norm_f.weight":
            state["ln_f.weight"] = value
        elif key.startswith("backbone.layers."):
            state["blocks." + key.removeprefix("backbone.layers.")] = value
        else:
            raise _error(folder, f"unexpected weight {key!r} for a Mamba-1 language model")
    config = GAMConfig(model="mamba", vocab_size=embedding.shape[0], pos_embedding="none", dropout=0.0,
                       mamba_wiring="standard", **fields)
    return config, state


def load_mamba_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> DecoderLM:
    """A Hugging Face ``MambaForCausalLM`` or mamba-ssm checkpoint folder as a
    :class:`DecoderLM` (fp32, eval mode)."""
    config, state = read_mamba_checkpoint(folder)
    model = DecoderLM(config)
    expected = model.state_dict()
    state["head.weight"] = state["token_embedding.weight"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{folder}: the weights do not fit the Mamba config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {shapes[:3]})")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def _read_tokenizer(path: Path, vocab_size: int):
    """The tokenizer at ``path`` (a tokenizer.json, or a folder holding one), checked to fit the model."""
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no tokenizer.json there" if path.is_dir() else f"{path}: no such tokenizer file")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{file}: not a tokenizers tokenizer.json ({str(err).splitlines()[0]})") from None
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"{file}: the tokenizer has {tokenizer.get_vocab_size():,} tokens, more than the model's "
                         f"{vocab_size:,} embedding rows (not this model's tokenizer?)")
    return file


def convert_mamba_checkpoint(folder: str | Path, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write a checkpoint folder of the project (config.json, model.safetensors, tokenizer.json,
    manifest.json) from a Mamba checkpoint folder. ``tokenizer``: a tokenizer.json (or a folder
    with one) to include; default: the source's tokenizer.json, if it has one.

    The folder is written under a temporary name beside ``out`` and renamed into place when
    complete, as ``gam export`` does: a failed conversion leaves nothing half-written.
    """
    from safetensors.torch import save_model

    folder, out = Path(folder), Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: output folder exists and is not empty")
    model = load_mamba_checkpoint(folder)
    if tokenizer is not None:
        tokenizer_file = _read_tokenizer(Path(tokenizer), model.config.vocab_size)
    elif (folder / "tokenizer.json").is_file():
        tokenizer_file = _read_tokenizer(folder / "tokenizer.json", model.config.vocab_size)
    else:
        tokenizer_file = None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f"{TEMP_PREFIX}{out.name}-")
    try:
        save_model(model, str(tmp / "model.safetensors"))
        # format_version and step: the layout of a training checkpoint (weights only), so the
        # commands that read checkpoints read this one too
        info = {"format_version": FORMAT_VERSION, "step": 0, "model_config": model.config.to_dict(),
                "converted_from": str(folder.resolve())}
        (tmp / "config.json").write_text(json.dumps(info, indent=2) + "\n")
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        apply_umask(tmp)
        write_manifest(tmp)
        os.replace(tmp, out)  # onto a missing or empty folder: atomic
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


NO_TOKENIZER = ("no tokenizer.json in the source: gam generate and gam export need one; convert again with "
                "--tokenizer FILE (mamba-ssm's checkpoints use EleutherAI/gpt-neox-20b's tokenizer.json)")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m gam.models.mamba_convert",
        description="Convert a Hugging Face MambaForCausalLM or mamba-ssm checkpoint folder "
                    "into a checkpoint folder of the project (gam verify / generate / export / eval read it).")
    parser.add_argument("source", help="folder with config.json and the weights")
    parser.add_argument("out", help="new (or empty) output folder")
    parser.add_argument("--tokenizer", default=None, metavar="FILE",
                        help="tokenizer.json (or a folder with one) to include (default: the source's)")
    args = parser.parse_args(argv)
    try:
        out = convert_mamba_checkpoint(args.source, args.out, tokenizer=args.tokenizer)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    note = "" if (out / "tokenizer.json").is_file() else f" ({NO_TOKENIZER})"
    print(f"wrote {out}{note}; gam verify {out} checks it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
