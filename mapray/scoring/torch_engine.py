"""The transformers engine: response-only log-probs and reward scores with plain PyTorch.

Log-probs never materialise vocabulary-sized logits for prompt positions: the model body runs over the whole
sequence, then the LM head is applied only to the positions that predict response tokens, `lm_head_chunk`
positions at a time, with an fp32 logsumexp. Sequences are length-sorted into batches under a token budget.
"""

from __future__ import annotations

import logging

import torch

from mapray.config import ModelConfig
from mapray.scoring.batching import budget_batches

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was configured but CUDA is not available on this worker")
    return torch.device(device)


class TorchLogprobEngine:
    def __init__(self, cfg: ModelConfig, local_path: str | None = None, model=None):
        """Loads the checkpoint at `local_path`, or wraps an already-built causal LM (`model`)."""
        from transformers import AutoModelForCausalLM

        self.device = pick_device(cfg.device) if model is None else next(model.parameters()).device
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(local_path, dtype=DTYPES[cfg.dtype]).to(self.device)
        self.model = model.eval()
        self.body = self.model.base_model
        self.head = self.model.get_output_embeddings()
        text_config = self.model.config.get_text_config()
        # Logit post-processing some architectures apply inside forward(); the head alone would miss it.
        self.softcap = getattr(text_config, "final_logit_softcapping", None)
        self.logit_scale = getattr(text_config, "logit_scale", None)
        self.token_budget = cfg.token_budget
        self.chunk = cfg.lm_head_chunk

    @torch.inference_mode()
    def logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[float]:
        lengths = [len(p) + len(r) for p, r in sequences]
        out = [0.0] * len(sequences)
        for batch in budget_batches(lengths, self.token_budget):
            sums = self._batch_logprobs([sequences[i] for i in batch])
            for i, value in zip(batch, sums):
                out[i] = value
        return out

    def _batch_logprobs(self, seqs: list[tuple[list[int], list[int]]]) -> list[float]:
        width = max(len(p) + len(r) for p, r in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        rows, positions, targets = [], [], []
        for b, (prompt, response) in enumerate(seqs):
            n = len(prompt) + len(response)
            ids[b, :n] = torch.tensor(prompt + response)
            mask[b, :n] = 1
            # position t predicts token t + 1: response tokens sit at [len(prompt), n)
            rows += [b] * len(response)
            positions += range(len(prompt) - 1, n - 1)
            targets += response
        hidden = self.body(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        rows_t = torch.tensor(rows, device=self.device)
        picked = hidden[rows_t, torch.tensor(positions, device=self.device)]
        token_lp = self.response_token_logprobs(picked, torch.tensor(targets, device=self.device))
        sums = torch.zeros(len(seqs), dtype=torch.float64, device=self.device)
        sums.index_add_(0, rows_t, token_lp.double())
        return sums.tolist()

    def response_token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log softmax(head(h))[target] for each row of `hidden`, chunked; naive: log_softmax(head(h)).gather."""
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], self.chunk):
            logits = self.head(hidden[start:start + self.chunk]).float()
            if self.logit_scale is not None:
                logits = logits * self.logit_scale
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            tgt = targets[start:start + self.chunk]
            out[start:start + self.chunk] = logits.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
        return out


class TorchRewardEngine:
    """Any `AutoModelForSequenceClassification` with one label; the raw logit of that label is the reward."""

    def __init__(self, cfg: ModelConfig, local_path: str):
        from transformers import AutoModelForSequenceClassification

        self.device = pick_device(cfg.device)
        self.model = AutoModelForSequenceClassification.from_pretrained(local_path, dtype=DTYPES[cfg.dtype])
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {local_path} has {self.model.config.num_labels} labels, expected 1")
        self.model.to(self.device).eval()
        self.token_budget = cfg.token_budget

    @torch.inference_mode()
    def rewards(self, sequences: list[list[int]]) -> list[float]:
        out = [0.0] * len(sequences)
        for batch in budget_batches([len(s) for s in sequences], self.token_budget):
            seqs = [sequences[i] for i in batch]
            for i, value in zip(batch, self._batch_rewards(seqs)):
                out[i] = value
        return out

    def _batch_rewards(self, seqs: list[list[int]]) -> list[float]:
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
        return logits[:, 0].double().tolist()


def _pad_id_avoiding(last_tokens: set[int], preferred: int | None) -> int:
    if preferred is not None and preferred not in last_tokens:
        return preferred
    return next(i for i in range(len(last_tokens) + 1) if i not in last_tokens)
