"""Handing `selected/` to TRL's DPOTrainer with mapray's reference log-probs, so the trainer runs no reference model.

TRL 1.x reads `ref_chosen_logps` / `ref_rejected_logps` from the batch only with `precompute_ref_log_probs=True`,
and then computes them itself before training (`DPOTrainer._precompute_ref_logps`), whatever the dataset already
holds. `MaprayDPOTrainer` is DPOTrainer with that one step skipped when the columns are there:

    from datasets import load_dataset
    from trl import DPOConfig
    from mapray.handoff import MaprayDPOTrainer

    train = load_dataset("parquet", data_files="OUT/selected/*.parquet", split="train")
    args = DPOConfig(output_dir="ckpt", precompute_ref_log_probs=True, max_length=...)  # mapray's max_length
    MaprayDPOTrainer(model=policy, args=args, train_dataset=train, processing_class=tokenizer).train()

The values are the trainer's own only when the trainer tokenizes like the run did: the same tokenizer, the
reference model's `max_length` and `truncation_mode`, and the dtype the run scored in (TRL's DPOConfig defaults to
bf16 autocast). Needs the `trl` extra.
"""

from __future__ import annotations

from trl import DPOTrainer

from mapray import columns as C

REF_COLUMNS = (C.REF_CHOSEN_LOGPS, C.REF_REJECTED_LOGPS)


class MaprayDPOTrainer(DPOTrainer):
    """DPOTrainer that takes the reference log-probs a mapray run wrote instead of recomputing them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.args.precompute_ref_log_probs:
            raise ValueError("MaprayDPOTrainer reads mapray's reference log-probs only with "
                             "DPOConfig(precompute_ref_log_probs=True); without it TRL runs a reference model")

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if not set(REF_COLUMNS) <= set(dataset.column_names):
            return super()._precompute_ref_logps(dataset, name, batch_size)
        for column in REF_COLUMNS:
            if any(value is None for value in dataset[column]):
                raise ValueError(f"{name} dataset: {column} has nulls (was the mapray run scored without a "
                                 "reference model, metric.implicit=simpo?); drop the column to let TRL compute it")
        return dataset
