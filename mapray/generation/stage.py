"""The generation stage: a Ray Data actor that samples N responses per prompt and writes one N-candidates row
per prompt, the row the existing candidates path scores (`mapray.formats`: prompt + all_generated_responses)."""

from __future__ import annotations

import pyarrow as pa

from mapray.config import GenerationConfig, ModelConfig
from mapray.generation.prompts import prompt_seed

# what generation adds to a prompt row (`mapray.generation.prompts.SCHEMA`); lists aligned with the samples
COLUMNS = {
    "all_generated_responses": pa.list_(pa.string()),
    "generation_logps": pa.list_(pa.float64()),  # raw log-prob sum of each sample's tokens
    "generation_tokens": pa.list_(pa.int64()),
    "finish_reasons": pa.list_(pa.string()),
    "generation_seed": pa.int64(),
}


class GenerateStage:
    """In: `prompt_id`, `prompt` (messages), `generation_error`. Out: the same rows with `COLUMNS`. A prompt
    that cannot be sampled (longer than the generator's context) or whose samples include an empty response
    (the reference code drops such prompts) gets its reason in `generation_error`; its samples are kept."""

    def __init__(self, cfg: ModelConfig, sampling: GenerationConfig, n: int | None = None):
        from mapray.generation.engine import VllmGenerator
        from mapray.stages import load_encoder

        self.encoder, local = load_encoder(cfg)
        self.generator = VllmGenerator(cfg, local)
        self.sampling, self.n = sampling, n or sampling.n
        self.max_length = cfg.max_length

    def __call__(self, table: pa.Table) -> pa.Table:
        errors = table.column("generation_error").to_pylist()
        ids = table.column("prompt_id").to_pylist()
        todo, encoded = [], []
        for i, prompt in enumerate(table.column("prompt").to_pylist()):
            if errors[i] is not None:
                continue
            try:
                tokens = self.encoder.encode_prompt(prompt)
            except Exception as e:  # a template that fails on this prompt costs its row, not the run
                errors[i] = f"prompt: the generator's chat template cannot render it ({type(e).__name__}: {e})"[:500]
                continue
            if len(tokens) >= self.max_length:
                errors[i] = (f"prompt: {len(tokens)} tokens, the generator's max_length is {self.max_length}: "
                             "no room to sample")
                continue
            todo.append(i)
            encoded.append(tokens)
        seeds = {i: prompt_seed(self.sampling.seed, ids[i]) for i in todo}
        samples = self.generator.generate(encoded, [seeds[i] for i in todo], self.sampling, self.n)
        return with_samples(table, errors, dict(zip(todo, samples)), seeds)


def unsampled(table: pa.Table) -> pa.Table:
    """Prompt rows that were all set aside before sampling, with `COLUMNS` empty: what `GenerateStage` writes for
    them, in a light task (no generator loaded)."""
    return with_samples(table, table.column("generation_error").to_pylist(), {}, {})


def with_samples(table: pa.Table, errors: list, samples: dict[int, list], seeds: dict[int, int]) -> pa.Table:
    """The prompt rows with `COLUMNS` filled from each sampled row's samples; `errors` are the rows' reasons so
    far, and a row whose samples include an empty response gets one (its samples are kept, for the record)."""
    values = {name: [None] * table.num_rows for name in COLUMNS}
    for i, drawn in samples.items():
        values["all_generated_responses"][i] = [s.text for s in drawn]
        values["generation_logps"][i] = [s.logprob for s in drawn]
        values["generation_tokens"][i] = [len(s.token_ids) for s in drawn]
        values["finish_reasons"][i] = [s.finish_reason for s in drawn]
        values["generation_seed"][i] = seeds[i]
        empty = sum(not s.text.strip() for s in drawn)
        if empty:
            errors[i] = f"{empty} of {len(drawn)} samples are empty (the reference code drops such prompts)"
    table = table.set_column(table.schema.get_field_index("generation_error"), "generation_error",
                             pa.array(errors, pa.string()))
    for name, type_ in COLUMNS.items():
        table = table.append_column(name, pa.array(values[name], type_))
    return table
