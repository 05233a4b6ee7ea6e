"""The transformers engine: response-only log-probs and reward scores with plain PyTorch.

Log-probs never materialise vocabulary-sized logits for prompt positions: the model body runs over the whole
sequence, then the LM head is applied only to the positions that predict response tokens, `lm_head_chunk`
positions at a time, with an fp32 logsumexp. A prompt runs once for all of its responses and short rows are
packed side by side (`mapray.scoring.packing`); rows are length-sorted into batches under a token budget.
Those rows attend through a dense tree mask (SDPA or eager attention) or, with `tree_attention: flex`, through
FlexAttention and the same rule as a block mask.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from mapray.config import ModelConfig
from mapray.scoring.batching import budget_batches
from mapray.scoring.packing import (
    SharedPromptRow,
    TreeBatch,
    group_by_common_prefix,
    group_by_prompt,
    plan_rows,
    tree_batch,
)

log = logging.getLogger(__name__)

# 8192^2 mask entries (64 Mi; 128 MiB as a bf16 bias) per row at most; longer sequences go one per row
TREE_MASK_MAX_TOKENS = 8192
# a block mask holds (width / 128)^2 tile entries: no practical cap (a 16k-token pair's two responses share
# their prompt in one row)
FLEX_MAX_TOKENS = 1 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was configured but CUDA is not available on this worker")
    return torch.device(device)


def _on_device(auto_class, cfg: ModelConfig, local_path: str | None, model):
    """The given model (tests, benchmarks) where it is, or the checkpoint at `local_path` in `cfg.dtype` on
    `cfg.device`; in eval mode, with its device."""
    if model is None:
        model = auto_class.from_pretrained(local_path, dtype=DTYPES[cfg.dtype]).to(pick_device(cfg.device))
    return model.eval(), next(model.parameters()).device


def use_tree_attention(cfg: ModelConfig, model) -> None:
    """Switches `model` to FlexAttention when `cfg.tree_attention` asks for it (one line if it cannot)."""
    if cfg.tree_attention != "flex" or model.config._attn_implementation == "flex_attention":
        return
    try:
        model.set_attn_implementation("flex_attention")
    except (ValueError, ImportError) as e:
        raise ValueError(f"tree_attention: flex needs FlexAttention, which {type(model).__name__} cannot use here "
                         f"({str(e).splitlines()[0]}); use tree_attention: mask") from e


def tree_mask_limit(cfg: ModelConfig, model) -> int:
    """Longest row that may go through the tree-mask path (prefix sharing, packing); 0: none may.

    The dense tree mask is a custom 4D mask: only the SDPA and eager attention paths take one, and it replaces
    the model's own mask, so a sliding window would be ignored: rows stay within the window. Its size is
    rows x width^2 (bool; SDPA turns it into a bias in the model's dtype), hence the cap. The block mask
    (FlexAttention) has no width^2 tensor: only the window bounds it.
    """
    implementation = model.config._attn_implementation
    flex = implementation == "flex_attention"
    if not (cfg.prefix_sharing or cfg.packing) or implementation not in ("sdpa", "eager", "flex_attention"):
        return 0
    text = model.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    uses_window = window and getattr(text, "use_sliding_window", True) and (
        layer_types is None or "sliding_attention" in layer_types)
    cap = FLEX_MAX_TOKENS if flex else TREE_MASK_MAX_TOKENS
    return min(cap, window) if uses_window else cap


def block_mask_layout(cfg: ModelConfig, model) -> tuple[bool, int]:
    """Whether tree rows get a block mask (the model runs on FlexAttention), and the width rows are packed up
    to: the token budget for a block mask (its cost is the tiles used, not width^2), the longest row (0) for
    the dense one."""
    flex = model.config._attn_implementation == "flex_attention"
    return flex, cfg.token_budget if flex else 0


def run_body(body, model, batch: TreeBatch, tree: bool) -> torch.Tensor:
    """The model body's last hidden states over a tree (or plain padded) batch."""
    mask = batch.attention_mask
    if tree and model.config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(model.dtype).min)
    device = next(model.parameters()).device
    with one_kernel_per_shape(model, device):
        return body(input_ids=batch.input_ids.to(device), attention_mask=mask.to(device),
                    position_ids=batch.position_ids.to(device)).last_hidden_state


def one_kernel_per_shape(model, device: torch.device):
    """How compiled FlexAttention meets a new batch shape. CUDA: torch's default (a second shape recompiles the
    kernel for any shape). CPU: one kernel per shape, because in torch 2.13 the CPU kernel compiled for any
    shape does not build (a C++ error on a model's strided q/k/v, seen on the second shape); past torch's
    recompile limit (8 shapes) FlexAttention runs uncompiled, still exact."""
    if device.type == "cpu" and model.config._attn_implementation == "flex_attention":
        return torch._dynamo.config.patch(automatic_dynamic_shapes=False)
    return contextlib.nullcontext()


class TorchLogprobEngine:
    def __init__(self, cfg: ModelConfig, local_path: str | None = None, model=None):
        """Loads the checkpoint at `local_path`, or wraps an already-built causal LM (`model`)."""
        from transformers import AutoModelForCausalLM

        self.model, self.device = _on_device(AutoModelForCausalLM, cfg, local_path, model)
        use_tree_attention(cfg, self.model)
        self.body = self.model.base_model
        self.head = self.model.get_output_embeddings()
        text_config = self.model.config.get_text_config()
        # Logit post-processing some architectures apply inside forward(); the head alone would miss it.
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.logit_scale = getattr(text_config, "logit_scale", None)
        self.token_budget = cfg.token_budget
        self.chunk = cfg.lm_head_chunk
        self.prefix_sharing, self.packing = cfg.prefix_sharing, cfg.packing
        self.tree_limit = tree_mask_limit(cfg, self.model)
        self.block_mask, self.pack_to = block_mask_layout(cfg, self.model)

    @torch.inference_mode()
    def logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[float]:
        out = [0.0] * len(sequences)
        if self.prefix_sharing:
            rows = group_by_prompt(sequences)
        else:
            rows = [SharedPromptRow(prompt, [(i, response)]) for i, (prompt, response) in enumerate(sequences)]
        packed, alone = plan_rows(rows, self.tree_limit, self.packing, self.pack_to)
        # a sequence too long for the tree mask (or a model that cannot take one) is a row of its own with a
        # plain padding mask: no width^2 mask, and SDPA may pick its flash kernel
        for rows_, tree in ((packed, True), ([[row] for row in alone], False)):
            lengths = [sum(map(len, members)) for members in rows_]
            for batch in budget_batches(lengths, self.token_budget):
                self._score_rows([rows_[i] for i in batch], tree, out)
        return out

    def _score_rows(self, packed: list[list[SharedPromptRow]], tree: bool, out: list[float]) -> None:
        batch = tree_batch(packed, tree, self.device, block_mask=tree and self.block_mask)
        hidden = run_body(self.body, self.model, batch, tree)
        rows_t = batch.rows.to(self.device)
        picked = hidden[rows_t, batch.slots.to(self.device)]
        token_lp = self.response_token_logprobs(picked, batch.targets.to(self.device))
        owners, local = batch.owners.unique(return_inverse=True)
        sums = torch.zeros(len(owners), dtype=torch.float64, device=self.device)
        sums.index_add_(0, local.to(self.device), token_lp.double())
        for i, value in zip(owners.tolist(), sums.tolist()):
            out[i] = value

    def response_token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log softmax(head(h))[target] for each row of `hidden`, chunked; naive: log_softmax(head(h)).gather."""
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # at least fp32 (a bf16 model); fp64 stays
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], self.chunk):
            logits = self.head(hidden[start:start + self.chunk]).to(dtype)
            if self.logit_scale is not None:
                logits = logits * self.logit_scale
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            tgt = targets[start:start + self.chunk]
            out[start:start + self.chunk] = logits.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        return out


class TorchRewardEngine:
    """Any `AutoModelForSequenceClassification`: the raw logits of its labels (one label: the reward; several:
    a multi-objective head, reduced to one reward by the stage's `label_weights`).

    Models built on transformers' generic sequence-classification head (Llama, Qwen, Mistral, Gemma and most
    decoder reward models) take the log-prob path's tree rows: sequences that share a leading part (a pair's
    templated prompt) share it, rows are packed side by side, and the head is applied at each sequence's last
    token. Any other head (or a sequence past the tree-mask limit) goes through the model's own forward on a
    padded batch.
    """

    def __init__(self, cfg: ModelConfig, local_path: str | None = None, model=None):
        from transformers import AutoModelForSequenceClassification
        from transformers.modeling_layers import GenericForSequenceClassification

        self.model, self.device = _on_device(AutoModelForSequenceClassification, cfg, local_path, model)
        self.token_budget = cfg.token_budget
        use_tree_attention(cfg, self.model)
        generic = isinstance(self.model, GenericForSequenceClassification)
        self.tree_limit = tree_mask_limit(cfg, self.model) if generic and cfg.packing else 0
        self.block_mask, self.pack_to = block_mask_layout(cfg, self.model)

    def rewards(self, sequences: list[list[int]]) -> list[float]:
        """The raw logit of the first label of each sequence: the reward of a single-label head."""
        return [scores[0] for scores in self.label_scores(sequences)]

    @torch.inference_mode()
    def label_scores(self, sequences: list[list[int]]) -> list[list[float]]:
        """The raw logit of every label, for each sequence."""
        out: list[list[float]] = [[]] * len(sequences)
        # a pair's two sequences share their templated prompt: found as their common prefix, computed once
        if self.tree_limit:
            rows = group_by_common_prefix(sequences)
        else:
            rows = [SharedPromptRow([], [(i, s)]) for i, s in enumerate(sequences)]
        packed, alone_rows = plan_rows(rows, self.tree_limit, capacity=self.pack_to)
        for batch in budget_batches([sum(map(len, members)) for members in packed], self.token_budget):
            tree = tree_batch([packed[i] for i in batch], device=self.device, block_mask=self.block_mask)
            hidden = run_body(self.model.base_model, self.model, tree, True)
            # the head reads each sequence's last token: where the owner changes in the token order
            last = torch.ones(len(tree.owners), dtype=torch.bool)
            last[:-1] = tree.owners[1:] != tree.owners[:-1]
            picked = hidden[tree.rows[last].to(self.device), tree.token_slots[last].to(self.device)]
            for i, value in zip(tree.owners[last].tolist(), self.model.score(picked).double().tolist()):
                out[i] = value
        alone = [row.responses[0][0] for row in alone_rows]
        for batch in budget_batches([len(sequences[i]) for i in alone], self.token_budget):
            seqs = [sequences[alone[i]] for i in batch]
            for i, value in zip(batch, self._batch_rewards(seqs)):
                out[alone[i]] = value
        return out

    def _batch_rewards(self, seqs: list[list[int]]) -> list[list[float]]:
        # Sequence-classification heads pool at the rightmost token that is not pad_token_id, so the pad id
        # must differ from every row's last real token (a template ending in EOS with pad = EOS would
        # otherwise pool one token early).
        pad = _pad_id_avoiding({s[-1] for s in seqs}, self.model.config.get_text_config().pad_token_id)
        self.model.config.get_text_config().pad_token_id = pad
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s)
            mask[b, :len(s)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return logits.double().tolist()


def _pad_id_avoiding(last_tokens: set[int], preferred: int | None) -> int:
    if preferred is not None and preferred not in last_tokens:
        return preferred
    return next(i for i in range(len(last_tokens) + 1) if i not in last_tokens)
