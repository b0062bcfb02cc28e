"""Serve a trained run: base + adapter, prompts rendered with the run's own template.

model = lk.InferenceModel.load("runs/support-bot")
model.generate("Summarize: ...")                      # -> the response text only
model.generate(["first prompt", "second prompt"])     # -> a list, generated as one left-padded batch
model.merge().save("runs/support-bot-merged")         # plain transformers can load this
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lorakit.config import ModelSpec, QuantSpec
from lorakit.errors import ConfigError
from lorakit.run import ADAPTER_CONFIG, read_run

__all__ = ["InferenceModel"]

TEMPLATE_FILE = "lorakit_template.json"


class InferenceModel:
    """A causal LM (with or without a LoRA adapter), its tokenizer and the prompt template it was trained with.

    Build it with :meth:`load`; :meth:`merge` returns a new, adapter-free instance and leaves this one as it is.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: Any,
        *,
        base_spec: ModelSpec | None = None,
        base_path: str | None = None,
        quant: QuantSpec | None = None,
        adapter_dir: Path | None = None,
        dtype: str = "fp32",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.base_spec = base_spec
        self.base_path = base_path
        self.quant = quant
        self.adapter_dir = adapter_dir
        self.dtype = dtype

    # --- loading ------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, *, base: str | None = None, template: Any = None) -> InferenceModel:
        """Load a lorakit run directory, a PEFT adapter directory, or a model saved by :meth:`save`.

        Args:
            path: the directory.
            base: the base model (path, Hub id or alias) to put the adapter on; by default the run's own base
                (or ``base_model_name_or_path`` of a plain PEFT adapter).
            template: override the prompt template; by default the one saved with the run.
        """
        from lorakit.models import (
            device_kind,
            load_base_model,
            load_tokenizer,
            resolve_model_path,
            torch_dtype,
        )
        from lorakit.templates import get_template, template_from_dict

        path = Path(path).expanduser()
        if path.is_dir() and (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
            return cls._load_plain(path, template)
        run = read_run(path)
        quant = None
        precision = "fp32"
        if run is not None:
            config = run["pipeline"]
            spec = ModelSpec(**config["model"])
            quant = QuantSpec(**config["quant"]) if config.get("quant") else None
            saved_template = template_from_dict(run["template"])
            precision = run.get("precision", "fp32") if device_kind() == "cuda" else "fp32"
        else:
            adapter_config = json.loads((path / ADAPTER_CONFIG).read_text())
            spec = ModelSpec(adapter_config.get("base_model_name_or_path") or "")
            saved_template = None
        if base is not None:
            spec = ModelSpec(base, trust_remote_code=spec.trust_remote_code)
        base_path = resolve_model_path(spec)
        tokenizer = load_tokenizer(
            str(path) if (path / "tokenizer_config.json").is_file() else base_path, spec
        )
        chosen = template if template is not None else saved_template
        if chosen is None:
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError(
                    f"{path} is a plain PEFT adapter without a lorakit run file, and its tokenizer has no chat "
                    "template: pass template='alpaca' (or the template it was trained with)."
                )
            chosen = "model"
        model = _attach_adapter(
            load_base_model(base_path, spec, dtype=torch_dtype(precision), quant=quant), path
        )
        return cls(
            model,
            tokenizer,
            get_template(chosen),
            base_spec=spec,
            base_path=base_path,
            quant=quant,
            adapter_dir=path,
            dtype=precision,
        )

    @classmethod
    def from_model(cls, name_or_path: str, *, template: Any = "model") -> InferenceModel:
        """A base model without adapter (e.g. to measure it before fine-tuning) with the given template."""
        from lorakit.models import resolve_model_path

        spec = ModelSpec(name_or_path)
        return cls._load_plain(Path(resolve_model_path(spec)), template, spec=spec)

    @classmethod
    def _load_plain(cls, path: Path, template: Any, *, spec: ModelSpec | None = None) -> InferenceModel:
        from lorakit.models import load_base_model, load_tokenizer, torch_dtype
        from lorakit.templates import get_template, template_from_dict

        spec = spec or ModelSpec(str(path))
        tokenizer = load_tokenizer(str(path), spec)
        if template is None and (path / TEMPLATE_FILE).is_file():
            template = template_from_dict(json.loads((path / TEMPLATE_FILE).read_text()))
        if template is None:
            template = "model"
        model = load_base_model(str(path), spec, dtype=torch_dtype("fp32")).eval()
        return cls(model, tokenizer, get_template(template), base_spec=spec, base_path=str(path))

    # --- generation ---------------------------------------------------------------------------------------

    def _messages(self, prompt: str | Mapping[str, Any]) -> list[dict[str, Any]]:
        """A prompt string or a data row (alpaca / prompt / messages form) -> messages ending with a user turn."""
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        if isinstance(prompt, Mapping):
            from lorakit.data import detect_format, to_messages

            row = dict(prompt)
            fmt = detect_format(list(row))
            for field in ("output", "completion"):
                row.setdefault(field, "-")  # the reply is not needed to render the prompt
            messages = to_messages(row, fmt, row_index=0, source_name="generate()")
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
            return messages
        raise ConfigError(
            f"generate() takes a prompt string, a row dict, or a list of them; got {type(prompt).__name__}."
        )

    def encode(self, prompt: str | Mapping[str, Any]) -> list[int]:
        """Token ids of a prompt exactly as training rendered it, ending with the assistant header."""
        from lorakit.data import encode_prompt

        return encode_prompt(self._messages(prompt), self.template, self.tokenizer)

    def generate(
        self,
        prompt: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        **gen_kwargs: Any,
    ) -> str | list[str]:
        """Generate the response to one prompt (a string) or a batch (a list of strings -> a list).

        ``temperature=0`` is greedy decoding; other keyword arguments go to ``model.generate`` (e.g. ``top_p``).
        Only the response text is returned, cut at the template's end-of-turn marker.
        """
        import torch

        single = isinstance(prompt, (str, Mapping))
        prompts = [prompt] if single else list(prompt)  # type: ignore[list-item]
        if not prompts:
            return []
        if max_new_tokens <= 0:
            raise ConfigError(f"`max_new_tokens` must be positive, got {max_new_tokens}.")
        encoded = [self.encode(p) for p in prompts]
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        stops = self.template.stop_strings(self.tokenizer)
        eos_ids = self._stop_token_ids(stops)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": eos_ids,
            "pad_token_id": pad,
            "do_sample": temperature > 0,
        }
        if temperature > 0:
            kwargs["temperature"] = temperature
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        multi_token_stops = [s for s in stops if len(self.tokenizer.encode(s, add_special_tokens=False)) > 1]
        if multi_token_stops:
            kwargs.update(stop_strings=multi_token_stops, tokenizer=self.tokenizer)
        kwargs.update(gen_kwargs)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs
            )
        texts = []
        for row in output[:, width:].tolist():
            ended = next((i for i, token in enumerate(row) if token in eos_ids), len(row))
            text = self.tokenizer.decode(row[:ended], skip_special_tokens=True)
            texts.append(_cut_at_stops(text, stops))
        return texts[0] if single else texts

    def _stop_token_ids(self, stops: list[str]) -> list[int]:
        ids = [self.tokenizer.eos_token_id]
        for stop in stops:
            tokens = self.tokenizer.encode(stop, add_special_tokens=False)
            if len(tokens) == 1 and tokens[0] not in ids:
                ids.append(tokens[0])
        return [i for i in ids if i is not None]

    # --- merge and export ---------------------------------------------------------------------------------

    @property
    def is_merged(self) -> bool:
        """True when the model carries no adapter (merged, or loaded from a plain model directory)."""
        return self.adapter_dir is None

    def merge(self) -> InferenceModel:
        """Fold the adapter into the base weights and return a new, adapter-free InferenceModel.

        The base is reloaded un-quantized (fp32 on CPU, the run's 16-bit dtype on a GPU) even when training
        used 4-bit or 8-bit weights: merging into quantized weights would round the update away.
        """
        from lorakit.models import load_base_model, torch_dtype

        if self.is_merged:
            return self
        if getattr(getattr(self.model, "active_peft_config", None), "is_prompt_learning", False):
            from lorakit.errors import ConfigError

            raise ConfigError(
                f"The adapter in {self.adapter_dir} is prompt-based (virtual tokens, not weight updates) and "
                "cannot be merged into the base weights. Serve it unmerged: InferenceModel.load(...).generate()."
            )
        assert self.base_spec is not None and self.base_path is not None and self.adapter_dir is not None
        base = load_base_model(self.base_path, self.base_spec, dtype=torch_dtype(self.dtype))
        merged = _attach_adapter(base, self.adapter_dir).merge_and_unload()
        return InferenceModel(
            merged.eval(),
            self.tokenizer,
            self.template,
            base_spec=self.base_spec,
            base_path=self.base_path,
            dtype=self.dtype,
        )

    def save(self, path: str | Path) -> Path:
        """Write a plain transformers model directory (safetensors, tokenizer, generation config).

        ``AutoModelForCausalLM.from_pretrained(path)`` loads it; ``InferenceModel.load(path)`` also restores
        the prompt template. Only an adapter-free model can be saved: call :meth:`merge` first.
        """
        from lorakit.run import write_json_atomic

        if not self.is_merged:
            raise ConfigError(
                "save() writes a plain transformers model, but this model still carries an adapter. "
                "Call .merge() first (model.merge().save(path)); the adapter itself is already in the run directory."
            )
        path = Path(path).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        stops = self._stop_token_ids(self.template.stop_strings(self.tokenizer))
        self.model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        self.model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
        write_json_atomic(path / TEMPLATE_FILE, self.template.to_dict())
        return path

    def __repr__(self) -> str:
        where = "merged" if self.is_merged else f"adapter={self.adapter_dir}"
        return f"InferenceModel(base={self.base_path!r}, {where}, template={self.template.name!r})"


def _attach_adapter(base: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _cut_at_stops(text: str, stops: list[str]) -> str:
    cut = len(text)
    for stop in stops:
        if stop:
            index = text.find(stop)
            if index != -1:
                cut = min(cut, index)
    return text[:cut].strip()
