"""GGUF export: a merged Llama-architecture model as one ``.gguf`` file (llama.cpp, Ollama, LM Studio) and an
Ollama ``Modelfile`` beside it.

    model = lk.InferenceModel.load("runs/support-bot")
    model.export_gguf("support-bot.gguf", dtype="q8_0")      # merges first; CLI: lorakit export RUN OUT.gguf

The file is written with the ``gguf`` package (llama.cpp's own gguf-py writer): the tensors under llama.cpp's
names (gguf-py's ``TensorNameMap``, the table transformers inverts on load), the query / key projections
permuted into llama.cpp's rotary layout (transformers un-permutes them on load), the byte-level BPE tokenizer
(vocabulary, merges, token types, special ids) and the run's template as ``tokenizer.chat_template`` (the
Jinja of :func:`lorakit.templates.jinja.to_chat_template`). ``dtype`` is ``f32``, ``f16`` or ``q8_0`` for the
matrices; norms stay f32, as llama.cpp's converter keeps them.

The ``Modelfile`` (``FROM ./<file>.gguf``) carries a Go ``TEMPLATE`` built from pieces of the run's template
(rendered around placeholder messages) and a ``PARAMETER stop`` line per end-of-turn string.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, MissingDependencyError
from lorakit.templates.jinja import to_chat_template

__all__ = ["DTYPES", "export_gguf", "modelfile", "ollama_pieces"]

DTYPES = ("f32", "f16", "q8_0")
"""The weight types :func:`export_gguf` writes."""

_ARCHITECTURES = ("llama",)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as error:
        raise MissingDependencyError(
            "GGUF export needs the gguf package (llama.cpp's gguf-py): pip install 'lorakit[export]'"
        ) from error
    return gguf


def _permute(weights: Any, heads: int) -> Any:
    """llama.cpp's rotary layout of a query / key projection (``convert_hf_to_gguf.py``'s ``permute``)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _tensor(gguf: Any, name: str, array: Any, dtype: str) -> tuple[Any, Any]:
    """The array to write and its raw GGML type: 1-D tensors in f32, matrices in ``dtype``."""
    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 1 or dtype == "f32":
        return array, gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if dtype == "q8_0" and array.shape[-1] % block == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array, kind), kind
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


def _write_tensors(writer: Any, gguf: Any, model: Any, dtype: str) -> None:
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for hf_name, param in model.state_dict().items():
        base, _, suffix = hf_name.rpartition(".")
        name = names.get_name(base)
        if name is None:
            raise ConfigError(f"GGUF export: no llama.cpp name for the tensor {hf_name!r} of this model.")
        if name == "output" and config.tie_word_embeddings:
            continue
        array = param.detach().float().cpu().numpy()
        if name.endswith(".attn_q"):
            array = _permute(array, heads)
        elif name.endswith(".attn_k"):
            array = _permute(array, kv_heads)
        data, kind = _tensor(gguf, f"{name}.{suffix}", array, dtype)
        writer.add_tensor(f"{name}.{suffix}", data, raw_dtype=kind)


def _write_config(writer: Any, gguf: Any, model: Any, name: str, dtype: str) -> None:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_types.get(dtype, gguf.LlamaFileType.MOSTLY_Q8_0))


def _write_tokenizer(writer: Any, gguf: Any, tokenizer: Any, vocab_size: int, chat_template: str) -> None:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer model."""
    import json

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE" or state.get("decoder", {}).get("type") != "ByteLevel":
        raise ConfigError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 / Llama 3 / SmolLM style); this tokenizer is "
            f"{model.get('type')} with a {state.get('decoder', {}).get('type')} decoder."
        )
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    kinds = [
        gguf.TokenType.CONTROL
        if i in special
        else (gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
        for i in range(vocab_size)
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    for setter, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            setter(token_id)
    writer.add_add_bos_token(_adds_bos(tokenizer))
    writer.add_chat_template(chat_template)


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of every encoded text (llama.cpp's ``add_bos_token``)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def export_gguf(
    model: Any,
    tokenizer: Any,
    template: Any,
    path: str | Path,
    dtype: str = "f16",
    *,
    name: str | None = None,
) -> Path:
    """Write the (merged, adapter-free) transformers ``model`` with ``tokenizer`` and ``template`` as a GGUF
    file at ``path``, and an Ollama ``Modelfile`` beside it. Returns the GGUF path.

    Use :meth:`lorakit.InferenceModel.export_gguf`, which merges the adapter first.

    Raises:
        ConfigError: an unknown ``dtype``, a model that is not a Llama-architecture decoder, a tokenizer that
            is not byte-level BPE, or a template that has no Jinja form.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"export_gguf(dtype={dtype!r}): pick one of {', '.join(DTYPES)}.")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise ConfigError(
            f"GGUF export supports Llama-architecture models ({', '.join(_ARCHITECTURES)}), not {model_type!r}."
        )
    if hasattr(model, "peft_config"):
        raise ConfigError("export_gguf() writes a merged model: call InferenceModel.merge() first.")
    gguf = _gguf()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_config(writer, gguf, model, name or path.stem, dtype)
    _write_tokenizer(writer, gguf, tokenizer, model.config.vocab_size, to_chat_template(template, tokenizer))
    _write_tensors(writer, gguf, model, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (path.parent / "Modelfile").write_text(modelfile(path.name, template, tokenizer))
    return path


# --- Ollama ----------------------------------------------------------------------------------------------

_S, _U, _A, _V = "\x01SYSTEM\x01", "\x01USER\x01", "\x01ANSWER\x01", "\x01NEXT\x01"


def _render(template: Any, tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    pieces = template.render(messages, tokenizer=tokenizer, add_generation_prompt=True)
    return "".join(text for text, _ in pieces)


def ollama_pieces(template: Any, tokenizer: Any) -> dict[str, str]:
    """The fixed text around the messages of ``template``'s prompts (rendered around placeholders).

    ``first`` starts a conversation without system message, ``system`` / ``after_system`` surround one,
    ``header`` follows each user message (the assistant header), ``between`` follows each assistant reply.
    Raises ConfigError when the template's prompts are not of this shape (the Modelfile could not match them).
    """
    plain = _render(template, tokenizer, [{"role": "user", "content": _U}])
    first, _, header = plain.partition(_U)
    multi = _render(
        template,
        tokenizer,
        [
            {"role": "user", "content": _U},
            {"role": "assistant", "content": _A},
            {"role": "user", "content": _V},
        ],
    )
    between = multi.partition(_A)[2].partition(_V)[0]
    pieces = {"first": first, "header": header, "between": between, "system": first, "after_system": ""}
    try:
        system = _render(
            template, tokenizer, [{"role": "system", "content": _S}, {"role": "user", "content": _U}]
        )
    except (ConfigError, ValueError):  # a template without system turns: the Modelfile ignores .System
        system = None
    if system is not None and _S in system:
        pieces["system"], _, rest = system.partition(_S)
        pieces["after_system"] = rest.partition(_U)[0]
    expected = first + _U + header + _A + between + _V + header
    if multi != expected:
        raise ConfigError(
            f"The template {getattr(template, 'name', template)!r} renders turns that depend on their position; "
            "an Ollama TEMPLATE cannot reproduce it. Export without a Modelfile and write its TEMPLATE by hand."
        )
    return pieces


def _go(text: str) -> str:
    """Literal text inside a Go template (``{{`` would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile(gguf_name: str, template: Any, tokenizer: Any) -> str:
    """An Ollama Modelfile for ``gguf_name`` whose TEMPLATE renders prompts as ``template`` does."""
    p = {key: _go(value) for key, value in ollama_pieces(template, tokenizer).items()}
    bos = tokenizer.bos_token or ""
    if bos and _adds_bos(tokenizer):  # llama.cpp adds BOS itself (tokenizer.ggml.add_bos_token)
        p = {
            key: value.removeprefix(bos) if key in ("first", "system") else value for key, value in p.items()
        }
    # One line, no trim markers: the pieces' own newlines and spaces are part of the prompt.
    go = (
        f"{{{{ if .System }}}}{p['system']}{{{{ .System }}}}{p['after_system']}{{{{ else }}}}{p['first']}{{{{ end }}}}"
        "{{ range .Messages }}"
        f'{{{{ if eq .Role "user" }}}}{{{{ .Content }}}}{p["header"]}'
        f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{p["between"]}'
        "{{ end }}{{ end }}"
    )
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go}"""']
    for stop in template.stop_strings(tokenizer):
        lines.append(f"PARAMETER stop {json_string(stop)}")
    return "\n".join(lines) + "\n"


def json_string(text: str) -> str:
    import json

    return json.dumps(text)
