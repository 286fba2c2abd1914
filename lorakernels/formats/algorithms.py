"""Key suffixes of adapter algorithms that are not additive LoRA, and therefore refused.

Additive LoRA is ``delta_W = scale * B @ A`` (see :mod:`lorakernels.formats.records`). These
algorithms share LoRA's key prefixes but not its suffixes, and none of them has that form:

- LoHa (Hadamard product of two low-rank products), LoKr (Kronecker product), GLoRA;
- full weight/bias differences (``diff``, ``diff_b``) and LyCORIS norm diffs;
- DoRA (a per-output-channel magnitude renormalises ``W + delta_W``, so the LoRA factors alone
  would be wrong, not merely incomplete);
- (IA)³ (an elementwise rescaling of inputs or outputs), OFT/BOFT (orthogonal rotations), VeRA;
- LoRA with a trained bias (PEFT ``lora_bias=True``): additive, but the bias term has no slot
  in the ``(x·Aᵀ)·Bᵀ`` kernel;
- LoRA on embedding tables and bundled textual-inversion embeddings.
"""

from __future__ import annotations

_BY_SUFFIX: dict[str, str] = {
    **{
        s: "LoHa"
        for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    },
    **{
        s: "LoKr"
        for s in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
        + ("lokr_t1", "lokr_t2")
    },
    **{s: "GLoRA" for s in ("a1.weight", "a2.weight", "b1.weight", "b2.weight")},
    "diff": "full weight diff",
    "diff_b": "full weight diff",
    "w_norm": "norm-layer diff",
    "b_norm": "norm-layer diff",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "lora_magnitude_vector.weight": "DoRA",
    "on_input": "(IA)3",
    "ia3_l": "(IA)3",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "oft_r": "OFT",
    "oft_R": "OFT",
    "oft_r.weight": "OFT",
    "boft_R": "BOFT",
    "boft_s": "BOFT",
    "vera_lambda_b": "VeRA",
    "vera_lambda_d": "VeRA",
    "lora_B.bias": "LoRA with a trained bias",
    "lora_up.bias": "LoRA with a trained bias",
    "lora_embedding_A": "LoRA on an embedding table",
    "lora_embedding_B": "LoRA on an embedding table",
}

_BY_PREFIX: dict[str, str] = {
    "bundle_emb.": "bundled textual-inversion embedding",
    "string_to_param.": "textual-inversion embedding",
    "emb_params": "textual-inversion embedding",
}


def algorithm_of_suffix(suffix: str) -> str | None:
    """The algorithm a key suffix (the part after the module name) belongs to, if not LoRA."""
    return _BY_SUFFIX.get(suffix)


def split_algorithm_key(key: str) -> tuple[str, str] | None:
    """``(algorithm, module stem)`` when a dotted key belongs to a non-LoRA algorithm, else None.

    The suffix is judged from the key's last two, then last one, dotted segments; the stem is
    the key without them (empty for whole-file markers such as embedding bundles).
    """
    for prefix, name in _BY_PREFIX.items():
        if key.startswith(prefix):
            return name, ""
    parts = key.split(".")
    for n in (2, 1):
        if len(parts) > n:
            found = _BY_SUFFIX.get(".".join(parts[-n:]))
            if found is not None:
                return found, ".".join(parts[:-n])
    return None
