"""Per-source loss (Instruction Pre-Training mixtures, data.per_source_loss): each source's
token-loss sums and counts are reduced separately, so ``loss/source<i>`` must equal the
single process's in every layout; "sources" batches carry per-sample dataset ids (one
source without any loss token) on top of uneven loss masks."""
LAYOUTS = {
    "sources_fsdp2": (2, {}, {}, "sources"),                 # ranks see different sources
    "sources_pp2": (2, {"pipeline": 2}, {}, "sources"),      # ids ride to the last stage with the labels
    "sources_tp2": (2, {"tensor": 2}, {}, "sources"),        # per-token loss under loss_parallel
}
