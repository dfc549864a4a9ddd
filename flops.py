"""Matmul FLOPs counted from shapes: the compute axis of train.py's logs and the numerator of bench.py's MFU.

Only the matmuls (the linears and attention's q.k^T and att.v) are counted; softmax, norms, activations,
rotary and the loss are left out (a few percent at the shapes here). A backward pass is 2x its forward.
Counted per row as computed, padding included: what the hardware does, not what the text needed.
"""


def matmul_params(cfg):
    """Weights that multiply activations: per block q, k, v (grouped-query: k and v have kv_heads heads), the
    output projection and the MLP (2 matrices, 3 for SwiGLU), plus the output head (d V). Not counted: the
    embedding (a lookup), the norms' gains and the biases."""
    return cfg.n_layer * _block_params(cfg) + cfg.d_model * cfg.vocab_size


def _qkv_params(cfg):
    return cfg.d_model * (cfg.n_head + 2 * cfg.kv_heads) * cfg.hd


def _rest_params(cfg):  # the output projection and the MLP: the part of a block that runs only for kept columns
    return cfg.n_head * cfg.hd * cfg.d_model + (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * cfg.d_mlp


def _block_params(cfg):
    return _qkv_params(cfg) + _rest_params(cfg)


def flops_forward(cfg, batch, q_len, k_start=0, n_out=None, head=True):
    """Matmul FLOPs of one forward of `batch` rows of `q_len` tokens each, appended after `k_start` tokens
    already in a KV cache (k_start = 0: a plain causal forward of q_len tokens), with logits for the last
    `n_out` columns only (GPT.forward's out_from = q_len - n_out; default: every column).

        linear:    2 * batch * (n_layer * qkv * q_len                        (q, k, v of every column)
                                + (n_layer - 1) * rest * q_len               (proj + MLP, all but the last block)
                                + (rest + d V) * n_out)                      (the last block's proj + MLP, the head)
        attention: 2 * 2 * n_head * head_dim * pairs                         (q.k^T and att.v, all heads)

    pairs counts the (query, key) pairs a causal model needs: query i (0-based) sees k_start + i + 1 keys
    (the cache and itself); every block has all q_len queries but the last, which has the last n_out. Masked
    pairs that a kernel may compute anyway are not counted. head=False: without the head (d V per column),
    for a forward whose logits a fused loss makes (flops_fused_loss)."""
    n_out = q_len if n_out is None else n_out
    L, rest = cfg.n_layer, _rest_params(cfg)
    linear = 2 * batch * (L * _qkv_params(cfg) * q_len + (L - 1) * rest * q_len
                          + (rest + cfg.d_model * cfg.vocab_size * head) * n_out)
    pairs = lambda q0: batch * sum(k_start + i + 1 for i in range(q0, q_len))  # noqa: E731  queries q0..q_len-1
    return linear + 4 * cfg.n_head * cfg.hd * ((L - 1) * pairs(0) + pairs(q_len - n_out))


def flops_generate(cfg, batch, prompt_len, new_tokens, prefill_rows=None):
    """rollout.generate: one prefill of the prompts (of prefill_rows distinct ones, default batch), then
    new_tokens - 1 one-token steps of every row (the last sampled token is not fed back); step t attends
    over the prompt_len + t filled slots and itself."""
    return (flops_forward(cfg, prefill_rows or batch, prompt_len, n_out=1)
            + sum(flops_forward(cfg, batch, 1, prompt_len + t) for t in range(new_tokens - 1)))


def flops_score(cfg, batch, prompt_len, length, prefill_rows=None, head=True):
    """teacher.score of the completion region of `batch` rows of `length` tokens: one forward with logits
    (head=False: hidden states) from the last prompt column on, or, with prompts shared (prefill_rows
    distinct ones < batch), their prefill and then every row's completion on top of its copy of the cache."""
    if prefill_rows and prefill_rows < batch:
        return (flops_forward(cfg, prefill_rows, prompt_len, n_out=1, head=head)
                + flops_forward(cfg, batch, length - prompt_len, k_start=prompt_len, head=head))
    return flops_forward(cfg, batch, length, n_out=length - prompt_len + 1, head=head)


def flops_train(cfg, batch, length, n_out, head=True):
    """A student forward + backward of `batch` rows of `length` tokens, logits for the last n_out columns."""
    return 3 * flops_forward(cfg, batch, length, n_out=n_out, head=head)


def flops_head(cfg, positions):
    """The output head on `positions` positions: 2 d V each."""
    return 2 * positions * cfg.d_model * cfg.vocab_size


def flops_fused_loss(s_cfg, t_cfg, positions, sampled=False):
    """losses.head_* on `positions` positions. A divergence to the teacher (t_cfg, not sampled): each model's
    head once and the student's two gradient matmuls, formed in the forward (3 student heads, 1 teacher).
    Per-token log-probabilities (SFT, RL: t_cfg None; the sampled loss): the student's head in the forward,
    again in the backward (recomputed) and its two gradient matmuls (4 heads), and with the sampled loss the
    teacher's head once for log p_T of the sampled tokens."""
    if t_cfg is not None and not sampled:
        return 3 * flops_head(s_cfg, positions) + flops_head(t_cfg, positions)
    return 4 * flops_head(s_cfg, positions) + (flops_head(t_cfg, positions) if t_cfg else 0)


def flops_train_step(s_cfg, t_cfg, batch, prefill_rows, cross_batch=None, sampled=False, recompute=False,
                     scored=True):
    """A train step after its rollouts (rollout.sample counts those): the teacher's scoring (t_cfg None: no
    teacher) and the student's forward + backward (3x) of rollout.Batch `batch`, both from the last prompt
    column on and without their heads, the prompts run for prefill_rows rows (distinct prompts when shared:
    rollout.shared_prompts), then the heads the fused loss runs on the completion tokens (flops_fused_loss;
    sampled: the teacher's head once). recompute (activation checkpointing): the student's blocks run
    forward twice, every row's prompt on its own. Across tokenizers (cross_batch: the teacher's layout,
    crosstok.py) both models run their whole sequences with logits everywhere. scored=False: the teacher's hidden
    states came from the rollout (--rollout skd), so its forward is not counted."""
    (B, T), P = batch.tokens.shape, batch.prompt_len
    if cross_batch is not None:
        Bt, Tt = cross_batch.tokens.shape
        return (flops_score(t_cfg, Bt, 1, Tt) + 3 * flops_forward(s_cfg, B, T)
                + (flops_forward(s_cfg, B, T, head=False) if recompute else 0))
    teacher = flops_score(t_cfg, B, P, T, prefill_rows, head=False) if t_cfg is not None and scored else 0
    student = (4 * flops_score(s_cfg, B, P, T, head=False) if recompute
               else 3 * flops_score(s_cfg, B, P, T, prefill_rows, head=False))
    return teacher + student + flops_fused_loss(s_cfg, t_cfg, batch.mask.sum().item(), sampled)
