"""Hugging Face ``transformers`` integration (extra ``[hf]``).

``import gam.hf`` registers ``model_type="gam"`` with ``AutoConfig`` and
``AutoModelForCausalLM``, so a folder written by ``save_pretrained`` (or by
``gam export``) loads with the Auto classes and no ``trust_remote_code``::

    import gam.hf  # registers the "gam" model type
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/")
    tok = AutoTokenizer.from_pretrained("out/")
    ids = tok("the cat", return_tensors="pt").input_ids
    print(tok.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))

One wrapper serves the three model kinds (``config.model``: gam, transformer,
mamba): :class:`GAMForCausalLM` holds a :class:`gam.models.lm.DecoderLM` under
``.model``, so its weights are ``model.<our names>`` in ``model.safetensors``
(the tied head stored once). ``generate()`` decodes with our per-layer
:class:`gam.generation.InferenceCache` (passed as ``cache``, or ``past_key_values`` in older
``transformers``), so a GAM
layer keeps k-1 vectors, not a KV cache.

Batched prompts of different lengths: **left** padding with an
``attention_mask`` (``tokenizer.padding_side = "left"``, as for any HF decoder).
Positions follow the mask and every block keeps the pads out of real tokens
(contract in :mod:`gam.models.lm`), so each row generates what it generates
alone. Right padding is fine in a plain forward (a Trainer batch) and refused
in a prompt to continue. ``output_hidden_states``
gives n_layer + 1 tensors: the embeddings, each block's output, the last one
after the final norm (as GPT-2 and Llama in ``transformers``). See
``docs/hf-interop.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from gam.config import GAMConfig
from gam.fileio import writer_errors_as_os_errors
from gam.generation import InferenceCache
from gam.models.lm import DecoderLM

_GAM_FIELDS = {f.name: f.default for f in dataclasses.fields(GAMConfig)}
_TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])
# The name under which generate() hands the cache to the model and reads it back from its output:
# `cache` in newer transformers (5.25 renamed it, warning on every use of the old name, which a
# later release removes), `past_key_values` before. Read from the installed version's own output
# class, so both ends of the supported range use their own name and none warns.
CACHE_NAME = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class GAMHFConfig(PretrainedConfig):
    """``transformers`` config holding every :class:`GAMConfig` field."""

    model_type = "gam"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
    }

    def __init__(self, **kwargs: Any):
        fields = {name: kwargs.pop(name, default) for name, default in _GAM_FIELDS.items()}
        gam_config = GAMConfig(**fields)  # validates, one-line ConfigError
        kwargs.setdefault("tie_word_embeddings", True)
        # The context length under the name the ecosystem reads (lm-evaluation-harness, vLLM, ...);
        # derived from block_size, absent when positions are unlimited.
        kwargs.pop("max_position_embeddings", None)
        if gam_config.max_seq_len is not None:
            kwargs["max_position_embeddings"] = gam_config.max_seq_len
        super().__init__(**kwargs)
        for name, value in gam_config.to_dict().items():
            setattr(self, name, value)

    def to_gam_config(self) -> GAMConfig:
        return GAMConfig(**{name: getattr(self, name) for name in _GAM_FIELDS})

    @classmethod
    def from_gam_config(cls, config: GAMConfig, **kwargs: Any) -> "GAMHFConfig":
        return cls(**config.to_dict(), **kwargs)


class GAMForCausalLM(PreTrainedModel, GenerationMixin):
    """A GAM / Transformer / Mamba :class:`DecoderLM` as a ``transformers`` causal LM."""

    config_class = GAMHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # the cache cannot be cropped (no assisted decoding)
    _no_split_modules = ["GAMBlock", "TransformerBlock", "MambaBlock"]
    _tied_weights_keys = ({"model.head.weight": "model.token_embedding.weight"}
                          if _TRANSFORMERS_MAJOR >= 5 else ["model.head.weight"])

    def __init__(self, config: GAMHFConfig):
        super().__init__(config)
        self.model = DecoderLM(config.to_gam_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Keep DecoderLM's own initialization (PyTorch defaults, xavier memory bank, as the paper)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained``; a local folder with a manifest (``gam
        export`` writes one) is first checked file by file, and refused if anything
        differs or is unlisted."""
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir() and (folder / "manifest.json").is_file():
            from gam.checkpoint import CheckpointError, manifest_problems

            problems = manifest_problems(folder)
            if problems:
                more = f" (and {len(problems) - 1} more; gam verify {folder} lists them)" if len(problems) > 1 else ""
                raise CheckpointError(problems[0] + more)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_gam(cls, model: DecoderLM) -> "GAMForCausalLM":
        """Wrap a trained :class:`DecoderLM` (its weights are copied)."""
        hf = cls(GAMHFConfig.from_gam_config(model.config))
        hf.model.load_state_dict(model.state_dict())
        return hf.to(next(model.parameters()).device).eval()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache: we bring InferenceCache

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.token_embedding

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.token_embedding = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.head = value

    def _new_cache(self, input_ids: torch.Tensor) -> InferenceCache:
        limit = self.model.config.max_seq_len
        hint = limit if limit is not None else 2 * input_ids.shape[1] + 64  # a KV cache grows if needed
        return self.model.allocate_inference_cache(input_ids.shape[0], hint, device=input_ids.device)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: InferenceCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        cache: InferenceCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for ``input_ids``; with ``cache`` or ``past_key_values`` (an InferenceCache,
        under either name: newer transformers pass ``cache``, older ``past_key_values``) or
        ``use_cache=True`` they continue the cached sequence; the output holds the cache under
        the installed version's name (:data:`CACHE_NAME`). ``labels`` are
        shifted inside, as in every ``transformers`` causal LM. ``attention_mask``:
        left padding for prompts (cached continuations are real tokens); right
        padding only in a plain forward (it cannot reach a real token)."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("GAMForCausalLM takes input_ids (inputs_embeds is not supported)")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states: list | None = [] if output_hidden_states else None
        if cache is not None and past_key_values is not None:
            raise ValueError("give the cache as cache or as past_key_values, not both")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, InferenceCache):
            raise ValueError(f"the cache must be a gam InferenceCache, got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = self._new_cache(input_ids)
        if cache is not None:
            logits = self.model.forward_cached(input_ids, cache, last_only=logits_to_keep == 1,
                                               attention_mask=attention_mask, hidden_states=hidden_states)
        else:
            logits, _ = self.model(input_ids, attention_mask=attention_mask, hidden_states=hidden_states)
        if logits_to_keep and logits.shape[1] > logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits for every position (logits_to_keep=0)")
            # Trainer passes num_items_in_batch (the labelled tokens of all accumulated
            # micro-batches) and then expects the sum over them, as transformers' causal LMs.
            num_items = kwargs.get("num_items_in_batch")
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100,
                                   reduction="mean" if num_items is None else "sum")
            if num_items is not None:
                loss = loss / torch.as_tensor(num_items, device=loss.device)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: cache},
                                        hidden_states=None if hidden_states is None else tuple(hidden_states))
        if return_dict is False:
            return output.to_tuple()
        return output

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: InferenceCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        cache: InferenceCache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed only the tokens the cache has not seen; slide the window past block_size.

        generate() passes the cache as ``cache`` (newer transformers) or ``past_key_values``
        (older); it goes back to forward() under the same name.

        With learned positions, once the sequence outgrows ``block_size`` the
        cache restarts and the last ``block_size`` tokens are prefilled, the
        same as ``DecoderLM.generate`` (and as cropping the input).
        """
        limit = self.model.config.max_seq_len
        inputs: dict[str, Any] = {"attention_mask": attention_mask}
        inputs.update((key, kwargs[key]) for key in ("logits_to_keep", "output_hidden_states") if key in kwargs)
        if not use_cache:
            inputs.update(input_ids=input_ids if limit is None else input_ids[:, -limit:], use_cache=False)
            if attention_mask is not None and limit is not None:
                inputs["attention_mask"] = attention_mask[:, -limit:]
            return inputs
        if cache is None:
            cache = past_key_values if past_key_values is not None else self._new_cache(input_ids)
        new = input_ids[:, cache.seen_tokens:]
        if limit is not None and cache.position + new.shape[1] > limit:
            cache.restart(self.model)
            cache.seen_tokens = input_ids.shape[1] - min(limit, input_ids.shape[1])
            new = input_ids[:, -limit:]
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask[:, -new.shape[1]:]
        inputs.update({"input_ids": new, CACHE_NAME: cache, "use_cache": True})
        return inputs

    def _reorder_cache(self, past_key_values: InferenceCache, beam_idx: torch.Tensor) -> InferenceCache:
        past_key_values.reorder_cache(beam_idx)
        return past_key_values


AutoConfig.register("gam", GAMHFConfig, exist_ok=True)
AutoModelForCausalLM.register(GAMHFConfig, GAMForCausalLM, exist_ok=True)


# ---------------------------------------------------------------- tokenizer and export

def hf_tokenizer(tokenizer, model_max_length: int | None = None):
    """A gam ``tokenizers.Tokenizer`` as a ``PreTrainedTokenizerFast``: its special tokens mapped
    to their roles (bos/eos/pad, and [UNK] for the paper's), ``model_max_length`` the longest
    input the model takes (its block_size; None: no limit), and no clean-up of spaces on decode,
    so the byte-level tokenizer's text comes back exactly."""
    from transformers import PreTrainedTokenizerFast

    from gam.tokenizer import special_token_roles

    limit = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False,
                                   **special_token_roles(tokenizer), **limit)


def export_readme(out: Path, checkpoint: str | Path, config: GAMConfig) -> str:
    """The export's model card: how to load it. transformers alone does not know the "gam" model
    type and answers that it "does not recognize this architecture" (update transformers)."""
    return f"""# {config.model} language model (gam export)

Exported by `gam export` from `{checkpoint}`: a {config.model} model with {config.n_layer} layers,
width {config.n_embd}, vocabulary {config.vocab_size:,}, context {config.max_seq_len or "unlimited"}.

transformers does not know the `gam` model type by itself: **`import gam.hf` first** (`pip install
"gam[hf]"`), which registers it with the Auto classes (no `trust_remote_code`). Without it,
transformers says it "does not recognize this architecture" and suggests updating transformers,
which does not help.

```python
import gam.hf  # registers model_type "gam" with transformers' Auto classes
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{out}")
tok = AutoTokenizer.from_pretrained("{out}")
ids = tok("The history of", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))
```

`gam verify {out}` checks every file against `manifest.json` (this README is not in it: edit it freely).
"""


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Convert a training checkpoint folder to a ``save_pretrained`` folder
    (safetensors + tokenizer + a manifest of every file's sha256, which
    :meth:`GAMForCausalLM.from_pretrained` and ``gam verify`` check).

    The folder is written beside ``out`` under a temporary name and renamed into
    place when complete, so a failed export leaves nothing half-written.
    """
    import shutil

    from gam.checkpoint import TEMP_PREFIX, load_checkpoint, write_manifest
    from gam.fileio import apply_umask, lock_temp_dir, make_temp_dir, remove_orphaned_temporaries

    out = Path(out)
    if any(parent.exists() and not parent.is_dir() for parent in out.parents):
        raise ValueError(f"{out}: a parent of the output folder is a file, not a folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: output folder exists and is not empty")
    ckpt = load_checkpoint(checkpoint)
    tokenizer = ckpt.tokenizer()
    model = ckpt.build_model()
    hf = GAMForCausalLM.from_gam(model)
    tok = hf_tokenizer(tokenizer, model.config.max_seq_len)
    if tok.pad_token_id is not None:
        hf.config.pad_token_id = tok.pad_token_id
        hf.generation_config.pad_token_id = tok.pad_token_id
    # Older transformers' pipeline() loads a tokenizer only for a model type it knows or a config
    # that names the tokenizer class; without it pipeline("text-generation", model=OUT) has none.
    hf.config.tokenizer_class = "PreTrainedTokenizerFast"
    out.parent.mkdir(parents=True, exist_ok=True)
    temp_prefix = f"{TEMP_PREFIX}{out.name}-"
    remove_orphaned_temporaries(out.parent, lambda name: name.startswith(temp_prefix))  # a killed export's
    tmp = make_temp_dir(out.parent, temp_prefix)
    lock = lock_temp_dir(tmp)
    try:
        with writer_errors_as_os_errors(tmp / "model.safetensors"):
            hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        # transformers 5 names its fast tokenizer class TokenizersBackend; the 4.x
        # name loads in both, so the folder works with either major version.
        tok_config = tmp / "tokenizer_config.json"
        if tok_config.is_file():
            data = json.loads(tok_config.read_text())
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            tok_config.write_text(json.dumps(data, indent=2) + "\n")
        apply_umask(tmp)  # safetensors writes 0600: a serving process under another user could not read it
        write_manifest(tmp)
        # After the manifest: a model card is never loaded, so editing it (say before pushing it to
        # the hub) leaves the folder verified.
        (tmp / "README.md").write_text(export_readme(out, checkpoint, model.config))
        apply_umask(tmp)
        os.replace(tmp, out)  # onto a missing or empty folder: atomic
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    return out
