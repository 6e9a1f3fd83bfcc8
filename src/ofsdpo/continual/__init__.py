"""COFS-DPO: continual alignment across domains without forgetting (SPEC §4), and the baselines it must beat.

For each domain in order: train (DPO or OFS-DPO) on its stream, keep its best fast module on the domain's selection
pairs (its memory: held out, never trained on and never in the report; `--selection heldout` chooses on the report's
pairs instead, as earlier versions did), and add the memory to the memory of all domains seen. Then serve:

- `cofs-dpo`:   a linear combination of the kept fast modules, θ ← λ θ_prev + (1 − λ) θ_F^(k) (the pairwise recursive
                form of SPEC §4), λ chosen on a grid by the lowest DPO loss (ties: higher accuracy) on the memory of
                every domain seen; `--combine params|delta` says what is combined (see `combine.py`).
- `dpo`, `ofs-dpo`: sequential training, one module carried through the domains (the forgetting baseline).
- `dpo-replay`: sequential DPO whose stream mixes in `memory_size` training pairs of every earlier domain.
- `lora-merge`: a fresh DPO LoRA per domain, merged with equal weights as the exact Σ ΔW/k (`combine_delta`: what
                peft's `add_weighted_adapter(..., "cat")` computes).
- `multitask`:  the upper bound: each stage a fresh DPO LoRA on the pairs of every domain seen, interleaved round-robin
                (each pair once; stage k trains k stages' worth of pairs).

Resuming (`--resume`): every finished stage leaves `domains/<k>-<name>/stage/` (its report rows, the served module,
the kept module, the combination weights and the reference's judged samples), written last-file-atomically; a
resumed run reads those instead of retraining, and the interrupted stage resumes from its own newest checkpoint
(or restarts, if it had none): the report and the served module are those of an uninterrupted run.

The package, one job a module: `domains` (each domain's pairs read and split, on-policy domains), `runner` (the
stage loop), `policies` (what each method trains, keeps and serves), `slots` (the adapters modules are scored in),
`persistence` (stage save and load, resume checks), `report` (the report, its per-unit values, the table).
"""

from ..config import ContinualConfig
from .domains import Domain
from .persistence import CONTINUAL_MARKERS
from .policies import CONTINUAL_POLICIES, ContinualPolicy, continual_policy, describe_search, interleave
from .report import build_report, format_table, headline_units
from .runner import ContinualRunner

__all__ = ["CONTINUAL_MARKERS", "CONTINUAL_POLICIES", "ContinualConfig", "ContinualPolicy", "ContinualRunner", "Domain",
           "build_report", "continual_policy", "describe_search", "format_table", "headline_units", "interleave"]
