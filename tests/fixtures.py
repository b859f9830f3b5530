"""Test utilities: tiny tokenizers and models built offline from real text.

No model hub is reachable, so tests and benchmarks build their teachers here:

* :func:`train_bpe_tokenizer` trains a byte-level BPE tokenizer (GPT-2 ``Ġ`` convention)
  on a list of texts and saves a standard Hugging Face tokenizer directory.
* :func:`make_tiny_causal_lm` saves a small Llama or GPT-2 model directory (random init,
  optionally trained for a few steps so its distributions are peaked like a real LM's)
  with the tokenizer copied in, loadable with ``AutoModelForCausalLM.from_pretrained``.
* :func:`make_tiny_classifier` saves an ``AutoModelForSequenceClassification`` directory
  for the sequence-level (classification) capture path.

Everything is deterministic given ``seed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def train_bpe_tokenizer(texts: Sequence[str], out_dir: str | Path, *, vocab_size: int = 800, add_bos: bool = True) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a HF tokenizer dir.

    Special tokens: ``<pad>`` (id 0), ``<s>`` (1, prepended when ``add_bos``), ``</s>``
    (2), ``<unk>`` (3). Offsets are character offsets into the input (``trim_offsets`` off)
    so byte spans of consecutive tokens tile the text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    fast.save_pretrained(str(out))
    return out


def _padded(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def make_tiny_causal_lm(
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    arch: str = "llama",
    pad_vocab_to_multiple_of: int = 64,
    vocab_size: int | None = None,
    max_positions: int = 1024,
    seed: int = 0,
    init_std: float = 0.2,
    train_texts: Sequence[str] | None = None,
    train_steps: int = 0,
    train_seq_len: int = 64,
    train_batch: int = 16,
    lr: float = 3e-3,
) -> Path:
    """Save a tiny causal LM directory (weights + config + tokenizer) and return its path.

    The embedding has ``len(tokenizer)`` rounded up to ``pad_vocab_to_multiple_of`` rows, as
    real checkpoints pad their vocabularies; the padded rows are never produced by the
    tokenizer. ``vocab_size`` overrides it (smaller than the tokenizer makes a broken
    teacher whose forward fails on high token ids: a fault-injection fixture). ``init_std`` larger than HF's default 0.02 gives an untrained model peaked
    (non-uniform) distributions; ``train_steps > 0`` additionally trains it with
    next-token CE on ``train_texts`` (AdamW, fp32) so it behaves like a (weak) real LM.
    """
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig  # noqa: PLC0415

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = vocab_size or _padded(len(tok), pad_vocab_to_multiple_of)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=max_positions, initializer_range=init_std,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
            n_inner=intermediate, initializer_range=init_std,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}")
    model = AutoModelForCausalLM.from_config(cfg)
    if train_steps:
        if not train_texts:
            raise ValueError("train_steps > 0 needs train_texts")
        _train_lm(model, tok, train_texts, steps=train_steps, seq_len=train_seq_len, batch=train_batch, lr=lr, seed=seed)
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _train_lm(model, tok, texts: Sequence[str], *, steps: int, seq_len: int, batch: int, lr: float, seed: int) -> None:
    """Next-token CE on a packed stream of the texts (documents separated by EOS)."""
    import torch  # noqa: PLC0415

    ids: list[int] = []
    for t in texts:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
    stream = torch.tensor(ids, dtype=torch.long)
    n_chunks = max(1, (len(stream) - 1) // seq_len)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, n_chunks, (batch,), generator=g) * seq_len
        x = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])
        if x.shape[1] < 2:
            break
        out = model(input_ids=x[:, :-1], labels=x[:, :-1])
        # HF shifts labels internally; this is plain next-token CE.
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    model.eval()


def make_tiny_classifier(
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path,
    num_labels: int = 2,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    init_std: float = 0.2,
    train_texts: Sequence[str] | None = None,
    train_labels: Sequence[int] | None = None,
    train_steps: int = 0,
    lr: float = 3e-3,
) -> Path:
    """Save a tiny ``LlamaForSequenceClassification`` directory (+ tokenizer); returns it.

    Optionally trains it for ``train_steps`` steps of CE on ``(train_texts, train_labels)``
    (batches of 16, texts truncated to 64 tokens) so its class distributions mean something.
    """
    import torch  # noqa: PLC0415
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig  # noqa: PLC0415

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(
        vocab_size=_padded(len(tok), 64), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=1024, initializer_range=init_std, num_labels=num_labels,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = AutoModelForSequenceClassification.from_config(cfg)
    if train_steps:
        if not train_texts or train_labels is None or len(train_texts) != len(train_labels):
            raise ValueError("train_steps > 0 needs train_texts and train_labels of equal length")
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        for _ in range(train_steps):
            pick = torch.randint(0, len(train_texts), (16,), generator=g).tolist()
            enc = tok([train_texts[i] for i in pick], truncation=True, max_length=64, padding=True, return_tensors="pt")
            out = model(**enc, labels=torch.tensor([int(train_labels[i]) for i in pick]))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
