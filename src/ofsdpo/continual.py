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

Resuming (`--resume`): every finished stage leaves `domains/<k>-<name>/stage/` (its report rows, the served module,
the kept module, the combination weights and the reference's judged samples), written last-file-atomically; a
resumed run reads those instead of retraining, and the interrupted stage resumes from its own newest checkpoint
(or restarts, if it had none): the report and the served module are those of an uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import list_checkpoints
from .combine import combine_delta, combine_params
from .config import (RESUME_MAY_CHANGE, WEIGHTS_ONLY, ContinualConfig, DomainSpec, OFSDPOConfig, changed_options,
                     read_config_file)
from .data import PreferenceData, load_preference_data
from .distributed import Processes
from .errors import ConfigError, DataError
from .scoring import heldout_scores_many
from .models import load_model_and_tokenizer, resolve_device
from .files import write_atomic, write_json
from .modules import activate, load_adapter_state, write_adapter
from .plotting import plot_heatmap
from .policies import continual_policy, describe_search
from .reference import ReferenceCache
from .reuse import NOT_COMPUTED, SharedWork
from .state import TrainResult
from .rundir import output_dir_lock, refuse_if_locked
from .trainer import OFSDPOTrainer

CONTINUAL_MARKERS = ("report.json", "domains")


def _subset(pairs: list[dict], source: str) -> PreferenceData:
    """Pairs re-indexed from 0, so each subset keys its own reference cache."""
    return PreferenceData(pairs=[{**p, "index": i} for i, p in enumerate(pairs)], source=source)


@dataclass
class Domain:
    name: str
    train: PreferenceData  # empty for an on-policy domain until its stage has sampled it
    test: PreferenceData
    memory: PreferenceData
    test_reference: ReferenceCache = None
    memory_reference: ReferenceCache = None
    train_reference: ReferenceCache = None
    on_policy: Any = None  # `prompts:PATH,judge=SPEC`: the domain (domains.PromptDomain) whose rounds the stage samples

    def __post_init__(self):
        for part in ("test", "memory", "train"):  # given (shared by runners over the same files), or new
            if getattr(self, f"{part}_reference") is None:
                setattr(self, f"{part}_reference", ReferenceCache(len(getattr(self, part))))


def _fits(held, lora) -> bool:
    """Whether an adapter configured as `held` can hold a module configured as `lora` (dropout aside: scoring
    runs without it)."""
    keys = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora")
    return all(getattr(held, k, None) == getattr(lora, k, None) for k in keys)


def _load_slot(model, name: str, lora, state: dict) -> None:
    """Adapter `name` holding `state`. The slot is kept between calls while its shape stays the same: peft's
    add/delete_adapter walk the whole model, and scoring runs many times per stage (the λ search, the report).
    The stage's `model.unload()` strips it with the rest."""
    held = model.peft_config.get(name)
    if held is not None and not _fits(held, lora):
        activate(model, next(n for n in model.peft_config if n != name))  # never delete the active adapter
        model.delete_adapter(name)
        held = None
    if held is None:
        model.add_adapter(name, lora)
    load_adapter_state(model, name, state)


class ContinualRunner:
    """Runs one method over the domains and writes `report.json`, the stage folders and the served adapter."""

    def __init__(self, config: ContinualConfig, model: Any = None, tokenizer: Any = None,
                 reference_scores: dict[str, list[float]] | None = None,
                 reference_caches: dict[tuple, ReferenceCache] | None = None,
                 shared: SharedWork | None = None):
        """`reference_scores` ({domain: the base's judged sample scores}) is shared and filled in place, so that
        several runners (the demo's methods, an experiment's seeds) judge the base model once. `reference_caches`
        likewise holds π_ref's log-probs of each pairs file domain's stream, report and memory pairs, for runners
        over the same base model and files (the demo's methods): the reference scores each pair once.
        `shared` (`reuse.SharedWork`), given to runners over the same base and seed, trains a stage and scores a
        served module once for all of them where they would compute it alike (the first stage of two cofs-dpo
        variants, say); without it, every stage trains and scores."""
        self.config = config
        self.policy = continual_policy(config.method)  # what each stage trains, keeps and serves (`policies.py`)
        cfg = config.training
        self.output_dir = Path(config.output_dir)
        held = [m for m in CONTINUAL_MARKERS if (self.output_dir / m).exists()]
        if held and not (config.overwrite or config.resume):
            raise ConfigError(f"--output-dir {self.output_dir} holds another run ({', '.join(held)}); "
                              "pass --resume to continue it or --overwrite to replace it.")
        refuse_if_locked(self.output_dir)  # another live run writes there: stop before anything loads
        if config.resume:
            self._check_resumable()
        self.processes = Processes(cfg.device)  # under `accelerate launch`, each stage trains data-parallel
        self.device = self.processes.device or resolve_device(cfg.device)
        if self.processes.sharded and config.judge_prompts:
            raise ConfigError("--judge-prompts is not supported under FSDP or DeepSpeed ZeRO-3: sampling runs a "
                              "different number of forwards on each process, which the all-gathers of the sharded "
                              "base cannot follow. Set --judge-prompts 0, or launch with configs/accelerate/ddp.yaml.")
        if model is None or isinstance(model, (str, Path)):  # under FSDP, on the CPU until the first stage shards it
            model, tokenizer, _, _ = load_model_and_tokenizer(
                str(model) if model else cfg.model, cfg.gguf_file, cfg.dtype,
                torch.device("cpu") if self.processes.sharded else self.device, cfg.trust_remote_code, self.device)
        if tokenizer is None:
            from .models import load_tokenizer

            tokenizer = load_tokenizer(model.config._name_or_path, cfg.gguf_file, cfg.trust_remote_code)
        self.base, self.tokenizer = model, tokenizer
        self._reference_caches = reference_caches if reference_caches is not None else {}
        self.domains = [self._load_domain(spec) for spec in config.domains]
        self._reference_scores = reference_scores if reference_scores is not None else {}
        self._shared = shared
        # the stage's trained adapters, free once its modules are saved: scoring borrows them ({slot: adapter}),
        # instead of injecting new LoRA layers into every target module of the model for each stage
        self._borrowed: dict[str, str] = {}

    def _load(self, source: str) -> PreferenceData:
        cfg = self.config.training
        return load_preference_data(source, self.tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.data_split)

    def _load_domain(self, spec: DomainSpec) -> Domain:
        if spec.prompts is not None:
            return self._load_on_policy_domain(spec)
        cfg, train = self.config, self._load(spec.train)
        pairs = train.pairs
        if spec.heldout:
            heldout = self._load(spec.heldout).pairs
        else:  # hold out the end of the stream: never trained on
            need = cfg.heldout_size + (0 if spec.memory else cfg.memory_size)
            if len(pairs) <= need:
                raise DataError(spec.train, f"has {len(pairs)} pairs; holding out {need} would leave none to train "
                                            "on (give heldout=PATH, or lower --heldout-size / --memory-size)")
            pairs, heldout = pairs[:-need], pairs[-need:]
        if spec.memory:
            memory = self._load(spec.memory).pairs[:cfg.memory_size]
        else:
            if len(heldout) <= cfg.memory_size:
                raise DataError(spec.heldout or spec.train, f"needs more than --memory-size ({cfg.memory_size}) "
                                                            "held-out pairs: the memory is carved from them")
            memory, heldout = heldout[:cfg.memory_size], heldout[cfg.memory_size:]
        training = cfg.training
        key = (spec.train, spec.heldout, spec.memory, cfg.heldout_size, cfg.memory_size, training.max_length,
               training.max_prompt_length, training.data_split)  # the same pairs, tokenized alike
        caches = self._reference_caches.get(key, {})
        domain = Domain(spec.name, _subset(pairs, spec.train), _subset(heldout, spec.heldout or spec.train),
                        _subset(memory, spec.memory or spec.heldout or spec.train), **caches)
        self._reference_caches[key] = {"train_reference": domain.train_reference,
                                       "test_reference": domain.test_reference,
                                       "memory_reference": domain.memory_reference}
        return domain

    def _load_on_policy_domain(self, spec: DomainSpec) -> Domain:
        """`NAME=prompts:PATH,judge=SPEC`: the stage samples its pairs from the policy, round by round. Its report
        and memory pairs come from heldout=PATH, or are sampled once from the base model on prompts kept out of
        the stream (a built-in domain's held-out prompts; else the last --heldout-size + --memory-size prompts)."""
        from .domains import prompt_domain
        from .rounds import RoundSettings, judged_pairs

        cfg, training = self.config, self.config.training
        if self.processes.count > 1:
            raise ConfigError(f"--domain {spec.name}: an on-policy domain runs in one process (each process would "
                              "sample pairs of its own); launch without data parallelism.")
        self.policy.check_on_policy(spec.name)
        domain = prompt_domain(spec.prompts, spec.judge, name=spec.name, max_new_tokens=training.max_new_tokens,
                               judge_device=training.judge_device or str(self.device))
        if spec.heldout:
            heldout = self._load(spec.heldout).pairs
        else:
            need = cfg.heldout_size + cfg.memory_size
            if spec.prompts.startswith("builtin:"):  # its own held-out prompts: never in a stream
                from .domains import get_domain

                held_records = get_domain(spec.prompts.split(":")[1]).prompts("heldout")[:need]
            else:
                if len(domain.records) <= need:
                    raise DataError(spec.prompts, f"has {len(domain.records)} prompts; holding out {need} "
                                                  "(--heldout-size + --memory-size) would leave none to train on")
                domain.records, held_records = domain.records[:-need], domain.records[-need:]
            domain.heldout = held_records
            settings = RoundSettings(training.samples_per_prompt, training.max_new_tokens, training.temperature,
                                     training.top_p, training.missing_eos_penalty, training.generation_batch_size)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(training.seed)  # the same held-out pairs for every method of a comparison
                rows, _ = judged_pairs(self.base, self.tokenizer, domain, held_records, settings)
            heldout = self._load_rows(rows, f"{spec.prompts} (held-out prompts, sampled from the base)").pairs
        if len(heldout) <= cfg.memory_size:
            raise DataError(spec.heldout or spec.prompts, f"gives {len(heldout)} held-out pairs; the memory "
                                                          f"(--memory-size {cfg.memory_size}) and the report need more")
        memory, heldout = heldout[:cfg.memory_size], heldout[cfg.memory_size:]
        source = spec.heldout or spec.prompts
        return Domain(spec.name, _subset([], f"on-policy:{spec.name}"), _subset(heldout, source),
                      _subset(memory, source), on_policy=domain)

    def _load_rows(self, rows: list[dict], source: str) -> PreferenceData:
        cfg = self.config.training
        data = load_preference_data(rows, self.tokenizer, cfg.max_length, cfg.max_prompt_length)
        data.source = source
        return data

    # --- the run ---------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        with output_dir_lock(self.output_dir, self.processes):  # held to the end, released on any exit
            return self._run()

    def _prepare_output(self) -> None:
        """The run's folder: another run's markers removed (unless resuming), this run's config.yaml written."""
        cfg, out = self.config, self.output_dir
        if self.processes.is_main:  # only the main process writes; the others compute the same combinations
            out.mkdir(parents=True, exist_ok=True)
            for marker in CONTINUAL_MARKERS if not cfg.resume else ():  # --overwrite was checked in __init__
                path = out / marker
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            cfg.save_yaml(out / "config.yaml")
        self.processes.barrier()

    def _train_stage(self, k: int, domain: Domain, base, init_state) -> tuple[OFSDPOTrainer, TrainResult]:
        """Stage k's trainer and its result: both modules start from `init_state` under --init previous, and a
        stage another runner already trained alike is restored (`reuse.SharedWork`)."""
        cfg = self.config
        trainer = self._stage_trainer(k, domain, base)
        initial = None
        if init_state is not None and cfg.init == "previous" and self.policy.carries_init:
            initial = init_state
            for name in trainer.names:  # SPEC §4 [our reading]: both modules start from the served module
                load_adapter_state(trainer.model, name, init_state)
        reusable = (self._shared is not None and domain.on_policy is None and self.processes.count == 1
                    and not trainer.config.resume)  # a sampled stream, ranks, a resumed stage: train here
        return trainer, (self._shared.train(trainer, initial) if reusable else trainer.train())

    def _run(self) -> dict:
        cfg, out, main = self.config, self.output_dir, self.processes.is_main
        self._prepare_output()
        kept, weights, init_state, stages = [], [], None, []
        matrix = {"loss": [], "accuracy": []}
        base = self.base
        for k, domain in enumerate(self.domains):
            finished = self._load_stage(k) if cfg.resume else None
            if finished is not None:  # --resume: this stage ended before the interruption
                stage, rows, kept_state, served, served_lora, weights = finished
                if kept_state is not None:
                    kept.append(kept_state)
                init_state = self.policy.next_init(served, served_lora, kept, cfg.training.lora_r)
                for key, row in rows.items():
                    matrix.setdefault(key, []).append(row)
                if "units" not in rows:  # a stage saved before per-unit scores were kept: no bootstrap units
                    matrix.setdefault("units", []).append(None)
                stages.append(stage)
                continue
            trainer, result = self._train_stage(k, domain, base, init_state)
            # the policy clones what it keeps: scoring may borrow the stage's adapters
            self._borrowed = dict(zip(("served", "candidate"), result.modules))
            if domain.on_policy is not None:  # the pairs the stage sampled: its stream, as a file domain's
                domain.train = _subset(result.pairs, f"on-policy:{domain.name}")
            stage = {"stage": k + 1, "domain": domain.name, "steps": result.steps,
                     "best_fast": result.summary.get("best_fast"), "lambda": None}
            served, served_lora, weights = self.policy.serve(self, k, trainer.model, result, kept, weights, stage)
            init_state = self.policy.next_init(served, served_lora, kept, cfg.training.lora_r)
            self._score_stage(k, trainer.model, served_lora, served, matrix)
            stages.append(stage)
            self._save_stage(k, stage, {key: rows[-1] for key, rows in matrix.items()},
                             kept[-1] if self.policy.keeps_modules else None, served, served_lora, weights)
            self._borrowed = {}
            # the next stage's trainer resets the same LoRA layers when it can (`attach_adapters`); after the last
            # stage every LoRA layer is stripped: the base goes back to the caller as it came
            keep = (k + 1 < len(self.domains) and self.processes.count == 1 and not self.processes.sharded
                    and not cfg.training.gradient_checkpointing)  # one process, hooks added once
            base = trainer.model if keep else trainer.model.unload()
        report = self._report(stages, matrix)
        if main:
            write_adapter(served_lora, served, out)
            self.tokenizer.save_pretrained(out)
            write_json(out / "report.json", report)
            write_atomic(out / "report.txt", format_table(report))
            plot_heatmap(report, out / "heatmap.png")
        self.processes.barrier()
        return report

    def _score_stage(self, k: int, model, served_lora, served, matrix: dict) -> None:
        """The served module after stage k on the domains' report pairs (and judged, with --judge-prompts): one
        matrix row; with --score-domains seen, the domains not trained yet are left out (None)."""
        scored = len(self.domains) if self.config.score_domains == "all" else k + 1
        seen = self.domains[:scored]

        def compute() -> dict:
            scores = self._score(model, served_lora, served, [(d.test, d.test_reference) for d in seen],
                                 per_pair=True)
            judged = self._judge(model, served_lora, served, scored) if self.config.judge_prompts else None
            return {"scores": scores, "judged": judged,
                    "reference": {d.name: self._reference_scores[d.name] for d in seen
                                  if d.name in self._reference_scores}}

        if self._shared is None or self.processes.count > 1 or any(d.on_policy is not None for d in seen):
            result = compute()
        else:
            result = self._shared.score(self._scoring_parts(model, served_lora, seen), served, compute)
            for name, scores in result["reference"].items():  # the base's samples a reused result was judged against
                self._reference_scores.setdefault(name, scores)
        scores = result["scores"] + [{}] * (len(self.domains) - scored)
        matrix["loss"].append([s.get("loss") for s in scores])
        matrix["accuracy"].append([s.get("accuracy") for s in scores])
        judged = result["judged"] or [{}] * len(self.domains)  # `_judge` returns one row per domain
        matrix.setdefault("units", []).append(  # per report pair and judged prompt: `headline_units`
            [None if "per_pair" not in s else {**s["per_pair"], "judge_score": j.get("per_prompt", {}).get(
                "judge_score")} for s, j in zip(scores, judged)])
        if result["judged"] is not None:
            for key in ("judge_score", "win_rate", "kl"):
                matrix.setdefault(key, []).append([j.get(key) for j in result["judged"]])

    def _scoring_parts(self, model, served_lora, seen: list[Domain]) -> dict:
        """What a served module's scores depend on besides its weights (`reuse.SharedWork.score`): the options
        but those of training and combining, the base, the LoRA shape and the scored domains' pairs."""
        from .stream import fingerprint

        not_scoring = NOT_COMPUTED | WEIGHTS_ONLY
        return {"options": {k: v for k, v in self.config.to_dict().items() if k not in not_scoring},
                "base": id(model.get_base_model()), "lora": served_lora.to_dict(),
                "domains": [(d.name, fingerprint(d.test)) for d in seen]}

    # --- resuming ----------------------------------------------------------------------------------------------------
    def _stage_dir(self, k: int) -> Path:
        return self.output_dir / "domains" / f"{k + 1}-{self.domains[k].name}"

    def _check_resumable(self) -> None:
        """--resume continues the run in --output-dir only if it is the same run: same options but for how it runs."""
        saved_path = self.output_dir / "config.yaml"
        if not saved_path.is_file():
            raise ConfigError(f"--resume: {self.output_dir} holds no continual run (no config.yaml).")
        saved = read_config_file(saved_path, ContinualConfig)
        now = self.config.to_dict()
        changed = changed_options(saved, now, RESUME_MAY_CHANGE)
        if changed:
            raise ConfigError(f"--resume: {saved_path} was written with other options ({', '.join(changed)}); "
                              "resume with the same options, or pass --overwrite to start again.")

    def _save_stage(self, k: int, stage: dict, rows: dict, kept_state, served, served_lora, weights) -> None:
        """What a resumed run needs of a finished stage; `stage.json` is written last, so it marks completeness."""
        if self.processes.is_main:
            folder = self._stage_dir(k) / "stage"
            if folder.exists():
                shutil.rmtree(folder)
            write_adapter(served_lora, served, folder / "served")
            if kept_state is not None:
                from safetensors.torch import save_file

                save_file({n: t.detach().contiguous().cpu() for n, t in kept_state.items()}, folder / "kept.safetensors")
            record = {"stage": stage, "rows": rows, "weights": weights, "reference_scores": self._reference_scores}
            write_json(folder / "stage.json", record)
        self.processes.barrier()

    def _load_stage(self, k: int):
        """(stage, rows, kept, served, served LoraConfig, weights) of a finished stage k, or None."""
        folder = self._stage_dir(k) / "stage"
        if not (folder / "stage.json").is_file():
            return None
        from peft import LoraConfig
        from safetensors.torch import load_file

        record = json.loads((folder / "stage.json").read_text(encoding="utf-8"))
        served_lora = LoraConfig.from_pretrained(str(folder / "served"))
        served_lora.inference_mode = False
        served = load_file(folder / "served" / "adapter_model.safetensors")
        kept = load_file(folder / "kept.safetensors") if (folder / "kept.safetensors").is_file() else None
        self._reference_scores.update(record["reference_scores"])  # the base's judged samples: drawn once per run
        return record["stage"], record["rows"], kept, served, served_lora, record["weights"]

    def _stage_trainer(self, k: int, domain: Domain, base) -> OFSDPOTrainer:
        cfg = self.config
        folder = self._stage_dir(k)
        resume = cfg.resume and bool(list_checkpoints(folder / "checkpoints"))  # the interrupted stage, if it saved
        values = dict(cfg.training.to_dict(), method=self.policy.stage_method, resume=resume, overwrite=True,
                      output_dir=str(folder), max_steps=cfg.max_steps_per_domain,
                      eval_steps=cfg.training.eval_steps or cfg.training.chase_interval)
        train, train_reference = domain.train, domain.train_reference
        mixed = self.policy.stage_pairs(k, train.pairs, self.domains[:k], cfg.memory_size)
        if mixed is not None:  # another stream: its own reference cache
            train, train_reference = _subset(mixed, domain.name), None
        # the selection pairs' reference log-probs are scored once, for every stage (and the λ search)
        if cfg.selection == "memory":
            selection, reference = domain.memory, domain.memory_reference
        else:
            selection, reference = domain.test, domain.test_reference
        return OFSDPOTrainer(base, OFSDPOConfig(**values), train_data=None if domain.on_policy else train,
                             tokenizer=self.tokenizer, eval_data=selection, eval_reference=reference,
                             on_policy_domain=domain.on_policy,
                             train_reference=None if domain.on_policy else train_reference)

    def _slot(self, model, name: str, lora, state: dict) -> str:
        """The adapter now holding `state` for slot `name`: the stage's trained adapter borrowed for it when its
        shape fits, else an adapter of that name (`_load_slot`)."""
        borrowed = self._borrowed.get(name)
        if borrowed is not None and _fits(model.peft_config[borrowed], lora):
            load_adapter_state(model, borrowed, state)
            return borrowed
        _load_slot(model, name, lora, state)
        return name

    def _score(self, model, lora, state, sets: list[tuple[PreferenceData, ReferenceCache]], name="served",
               per_pair: bool = False) -> list:
        """`state`'s loss and accuracy on each (pairs, reference) set, the sets' pairs in shared batches."""
        cfg = self.config.training
        name = self._slot(model, name, lora, state)
        return heldout_scores_many(model, sets, name, self.tokenizer.pad_token_id, cfg.beta,
                                   cfg.eval_batch_size or 2 * cfg.batch_size, cfg.logprob_chunk_size,
                                   per_pair=per_pair)

    def _judge(self, model, lora, state, scored: int) -> list[dict]:
        """Judge the served module's samples on the first `scored` domains' held-out prompts (built-in domains,
        and on-policy domains with their own judge: SPEC §6 evaluation). Under --score-domains all, every domain's
        prompts are sampled in one call; under seen, each domain in a call of its own (the domains judged change
        from stage to stage, and a row's random numbers depend on the call's rows). The reference's samples are
        drawn once per run with the same calls, under the run's seed: common random numbers."""
        from .scoring import common_random_numbers, judge_evals, reference_sample_groups

        served = self._slot(model, "served", lora, state)
        device = next(model.parameters()).device
        judged = [(i, d.name, task) for i, (d, task) in enumerate(zip(self.domains[:scored], self._judge_tasks()))
                  if task]
        calls = [judged] if self.config.score_domains == "all" else [[one] for one in judged]
        results = [{} for _ in self.domains]  # a domain of pairs files only (or not scored): nothing to judge
        for call in filter(None, calls):
            tasks = [task for _, _, task in call]
            if any(name not in self._reference_scores for _, name, _ in call):  # one set for all stages, methods
                with common_random_numbers(self.config.training.seed, device):
                    scores = reference_sample_groups(model, self.tokenizer, tasks,
                                                     samples_per_prompt=self.config.judge_samples)
                self._reference_scores.update({name: s for (_, name, _), s in zip(call, scores)})
            with common_random_numbers(self.config.training.seed, device):  # the reference's draws, row for row
                evals = judge_evals(model, self.tokenizer, tasks, served,
                                    ref_scores=[self._reference_scores[name] for _, name, _ in call],
                                    samples_per_prompt=self.config.judge_samples)
            for (i, _, _), result in zip(call, evals):
                results[i] = result
        return results

    def _judge_tasks(self) -> list[tuple | None]:
        """Per domain, (judged domain, held-out prompt records), or None for a domain of pairs files only."""
        from .domains import DOMAINS

        tasks = []
        for d in self.domains:
            judged = d.on_policy if d.on_policy is not None and d.on_policy.heldout else DOMAINS.get(d.name)
            if judged is not None and self.config.judge_max_new_tokens:
                judged = dataclasses.replace(
                    judged, max_new_tokens=min(judged.max_new_tokens, self.config.judge_max_new_tokens))
            tasks.append(None if judged is None else (judged, judged.prompts("heldout")[:self.config.judge_prompts]))
        return tasks

    def materialise(self, lora, states: list[dict], weights: list[float], combine: str | None = None):
        """The combined module as (state, LoraConfig); delta mode stacks ranks and keeps the scaling (the exact
        Σ λ ΔW, what peft's `add_weighted_adapter(..., "cat")` computes)."""
        if (combine or self.config.combine) == "params":
            return combine_params(states, weights), lora
        combined = copy.deepcopy(lora)
        combined.r = lora.r * len(states)
        combined.lora_alpha = lora.lora_alpha * len(states)  # scaling = alpha / r unchanged
        return combine_delta(states, weights), combined

    def memory_scores(self, model, lora, state, k: int) -> tuple[float, float]:
        """Mean DPO loss and accuracy over the memory of domains 1..k+1 (all seen so far), pair-weighted."""
        seen = self.domains[:k + 1]
        scores = self._score(model, lora, state, [(d.memory, d.memory_reference) for d in seen], name="candidate")
        total = sum(len(d.memory) for d in seen)
        return (sum(s["loss"] * len(d.memory) for s, d in zip(scores, seen)) / total,
                sum(s["accuracy"] * len(d.memory) for s, d in zip(scores, seen)) / total)

    def _report(self, stages: list[dict], matrix: dict) -> dict:
        units = matrix.get("units")
        matrix = {key: rows for key, rows in matrix.items() if key != "units"}
        names, acc, loss = [d.name for d in self.domains], matrix["accuracy"], matrix["loss"]
        last = len(names) - 1
        forgetting = {names[j]: max(acc[k][j] for k in range(j, last)) - acc[last][j] for j in range(last)}
        forgetting_loss = {names[j]: loss[last][j] - min(loss[k][j] for k in range(j, last)) for j in range(last)}
        extra = {}
        if "judge_score" in matrix:
            judge = matrix["judge_score"]
            judged = [j for j in range(len(names)) if judge[last][j] is not None]
            extra = {"base_judge_score": {n: sum(v) / len(v) for n, v in self._reference_scores.items()
                                          if n in names},
                     "cl/avg_judge_score": sum(judge[last][j] for j in judged) / max(1, len(judged)),
                     "cl/forgetting_judge": {names[j]: max(judge[k][j] for k in range(j, last)) - judge[last][j]
                                             for j in judged if j < last}}
        return {**extra,
            "method": self.config.method, "combine": self.config.combine, "init": self.config.init,
            "search": describe_search(self.config),
            "domains": names, "stages": stages, "matrix": matrix,
            "cl/avg_accuracy": sum(acc[last]) / len(names), "cl/avg_loss": sum(loss[last]) / len(names),
            "cl/forgetting": forgetting, "cl/forgetting_loss": forgetting_loss,
            "cl/bwt": sum(acc[last][j] - acc[j][j] for j in range(last)) / last if last else 0.0,
            "lambdas": [s["lambda"] for s in stages],
            "units": headline_units(matrix.get("judge_score"), units),
        }


def headline_units(judge: list[list] | None, units: list[list[dict | None]] | None) -> dict[str, list[float]]:
    """Per-unit values whose plain mean is each headline number of the report (`cl/avg_loss`, `cl/avg_accuracy`,
    `cl/bwt`, `cl/avg_judge_score`, `cl/avg_forgetting_judge`): the units a bootstrap resamples. A unit is a report
    pair (loss, correctness) or a judged prompt (its samples' mean score); a domain's units are scaled by
    U / (D · n_d) (U units over D domains, n_d of this one), so the mean over all units is the mean over domains
    as the report takes it. Forgetting is a max over stages: its units are the differences from the stage that
    attained the max in this run (the bootstrap holds that stage fixed). `units[k][j]`: stage k's per-unit scores
    on domain j ({"loss", "correct", "judge_score"}; None where not scored); {} if a stage has none (a stage saved
    before they were kept); a metric without units (e.g. `cl/bwt` of one domain) is left out."""
    if not units or any(row is None for row in units):
        return {}
    last = len(units) - 1
    final = units[last]
    if any(u is None for u in final):
        return {}

    def spread(parts: list[list[float]]) -> list[float]:
        total = sum(len(p) for p in parts)
        return [v * total / (len(parts) * len(p)) for p in parts for v in p]

    def difference(a: list[float], b: list[float]) -> list[float]:
        return [x - y for x, y in zip(a, b)]

    out = {"cl/avg_loss": spread([u["loss"] for u in final]),
           "cl/avg_accuracy": spread([u["correct"] for u in final])}
    if last and all(units[j][j] is not None for j in range(last)):
        out["cl/bwt"] = spread([difference(final[j]["correct"], units[j][j]["correct"]) for j in range(last)])
    judged = [j for j, u in enumerate(final) if u.get("judge_score") is not None]
    if judge is not None and judged:
        out["cl/avg_judge_score"] = spread([final[j]["judge_score"] for j in judged])
        peaks = [(j, max(range(j, last), key=lambda k: judge[k][j])) for j in judged if j < last]
        if peaks and all(units[k][j] is not None and units[k][j].get("judge_score") is not None for j, k in peaks):
            out["cl/avg_forgetting_judge"] = spread([difference(units[k][j]["judge_score"], final[j]["judge_score"])
                                                     for j, k in peaks])
    return out


def format_table(report: dict) -> str:
    names = report["domains"]
    width = max(8, *(len(n) for n in names))
    lines = [f"{report['method']}: served module's held-out preference accuracy (DPO loss) after each stage",
             "stage".ljust(12) + "".join(n.rjust(width + 10) for n in names)]
    for k, stage in enumerate(report["stages"]):
        cells = "".join(("-" if a is None else f"{a:.3f} ({l:.3f})").rjust(width + 10)
                        for a, l in zip(report["matrix"]["accuracy"][k], report["matrix"]["loss"][k]))
        lam = f"  λ={stage['lambda']}" if stage["lambda"] is not None else ""
        lines.append(f"{k + 1}-{stage['domain']}".ljust(12) + cells + lam)
    lines.append(f"cl/avg_accuracy {report['cl/avg_accuracy']:.3f}   cl/bwt {report['cl/bwt']:+.3f}   "
                 "cl/forgetting " + ", ".join(f"{k} {v:+.3f}" for k, v in report["cl/forgetting"].items()))
    if "judge_score" in report["matrix"]:
        lines.append("judge score of the served module's samples (KL to the reference)")
        for k, stage in enumerate(report["stages"]):
            cells = "".join(("-" if s is None else f"{s:+.3f} ({kl:.2f})").rjust(width + 10)
                            for s, kl in zip(report["matrix"]["judge_score"][k], report["matrix"]["kl"][k]))
            lines.append(f"{k + 1}-{stage['domain']}".ljust(12) + cells)
        lines.append(f"cl/avg_judge_score {report['cl/avg_judge_score']:+.3f}   cl/forgetting_judge " +
                     ", ".join(f"{k} {v:+.3f}" for k, v in report["cl/forgetting_judge"].items()))
    return "\n".join(lines) + "\n"
