"""Per-source loss (Instruction Pre-Training mixtures, data.per_source_loss): each source's
token-loss sums and counts are reduced separately, so ``loss/source<i>`` must equal the
single process's in every layout; "sources" batches carry per-sample dataset ids (one
source without any loss token) on top of uneven loss masks."""
from tests.distributed.layout import Layout

LAYOUTS = [
    Layout("sources_fsdp2", 2, data="sources"),                         # ranks see different sources
    Layout("sources_pp2", 2, parallel={"pipeline": 2}, data="sources"),  # ids ride to the last stage with the labels
    Layout("sources_tp2", 2, parallel={"tensor": 2}, data="sources"),    # per-token loss under loss_parallel
]
