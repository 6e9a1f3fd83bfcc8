"""The continual stage loop (SPEC §4): for each domain in order, train its stage (`policies.py` says with which
method, on which stream, from which weights), let the policy form the served module, score it on every domain's
report pairs (and judge its samples), save the stage for --resume (`persistence.py`), and write the report
(`report.py`) and the served adapter."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import list_checkpoints
from ..combine import combine_lora
from ..config import WEIGHTS_ONLY, ContinualConfig, OFSDPOConfig
from ..distributed import Processes
from ..domains import DOMAINS, builtin_name
from ..errors import ConfigError
from ..evaluation import EvalOptions, EvalSet, evaluate
from ..models import load_model_and_tokenizer, load_tokenizer, resolve_device
from ..modules import load_adapter_state
from ..reference import ReferenceCache
from ..reuse import NOT_COMPUTED, SharedWork
from ..rundir import check_once, output_dir_lock, refuse_if_locked
from ..state import TrainResult
from ..stream import fingerprint
from ..trainer import OFSDPOTrainer
from .domains import Domain, DomainLoader, subset
from .persistence import check_output_dir, check_resumable, load_stage, prepare_output, save_stage
from .policies import continual_policy
from .report import build_report, write_report
from .selection import Criterion, candidate_row
from .slots import Slots


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
        self.processes = Processes(cfg.device)  # under `accelerate launch`, each stage trains data-parallel
        check_once(self.processes, self._check_output_dir)  # before anything loads
        self.device = self.processes.device or resolve_device(cfg.device)
        if self.processes.sharded and config.judge_prompts:
            raise ConfigError("--judge-prompts is not supported under FSDP or DeepSpeed ZeRO-3: sampling runs a "
                              "different number of forwards on each process, which the all-gathers of the sharded "
                              "base cannot follow. Set --judge-prompts 0, or launch with configs/accelerate/ddp.yaml.")
        self._check_selection()
        if model is None or isinstance(model, (str, Path)):  # under FSDP, on the CPU until the first stage shards it
            model, tokenizer, _, _ = load_model_and_tokenizer(
                str(model) if model else cfg.model, cfg.gguf_file, cfg.dtype,
                torch.device("cpu") if self.processes.sharded else self.device, cfg.trust_remote_code, self.device)
        if tokenizer is None:
            tokenizer = load_tokenizer(model.config._name_or_path, cfg.gguf_file, cfg.trust_remote_code)
        self.base, self.tokenizer = model, tokenizer
        loader = DomainLoader(config, tokenizer, reference_caches if reference_caches is not None else {})
        self.domains = [self._load_domain(loader, spec) for spec in config.domains]
        self._reference_scores = reference_scores if reference_scores is not None else {}
        self._shared = shared
        self.slots = Slots()  # where modules are scored: the stage's trained adapters, borrowed when they fit
        # --select-by: each domain's own kept module's memory loss (fixed once kept), and the base's judged samples
        # on the selection prompts (apart from the report's: other prompts, one call per domain)
        self._own_memory_loss: dict[int, float] = {}
        self._selection_reference: dict[str, list[float]] = {}

    def _check_selection(self) -> None:
        """--select-by judge: every domain judged (a built-in one, or on-policy with its judge); before anything
        loads."""
        if self.config.select_by != "judge":
            return
        for spec in self.config.domains:
            if spec.prompts is None and builtin_name(spec.name) not in DOMAINS:
                raise ConfigError(f"--select-by judge needs a judge for every domain; {spec.name} has none")
        if self.processes.sharded:
            raise ConfigError("--select-by judge samples, which FSDP or DeepSpeed ZeRO-3 cannot follow (as "
                              "--judge-prompts): use another --select-by, or launch with configs/accelerate/ddp.yaml.")

    def _check_output_dir(self) -> None:
        check_output_dir(self.config, self.output_dir)
        refuse_if_locked(self.output_dir)  # another live run writes there
        if self.config.resume:
            check_resumable(self.config, self.output_dir)

    def _load_domain(self, loader: DomainLoader, spec) -> Domain:
        if spec.prompts is None:
            return loader.pairs_domain(spec)
        if self.processes.count > 1:
            raise ConfigError(f"--domain {spec.name}: an on-policy domain runs in one process (each process would "
                              "sample pairs of its own); launch without data parallelism.")
        self.policy.check_on_policy(spec.name)
        return loader.on_policy_domain(spec, self.base, self.device)

    # --- the run ---------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        with output_dir_lock(self.output_dir, self.processes):  # held to the end, released on any exit
            return self._run()

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
        # a sampled stream or several ranks: train here. A stage resumed from its checkpoint is shared like any
        # other (`resume` is not in its key): it ends as the uninterrupted stage does, and a later variant that
        # trains the same stage (its --select-by differs, not its training) reuses it
        reusable = self._shared is not None and domain.on_policy is None and self.processes.count == 1
        return trainer, (self._shared.train(trainer, initial) if reusable else trainer.train())

    def _run(self) -> dict:
        cfg, out, main = self.config, self.output_dir, self.processes.is_main
        prepare_output(cfg, out, self.processes)
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
            self.slots.borrow(result.modules)
            if domain.on_policy is not None:  # the pairs the stage sampled: its stream, as a file domain's
                domain.train = subset(result.pairs, f"on-policy:{domain.name}")
            stage = {"stage": k + 1, "domain": domain.name, "steps": result.steps,
                     "best_fast": result.summary.get("best_fast"), "lambda": None}
            served, served_lora, weights = self.policy.serve(self, k, trainer.model, result, kept, weights, stage)
            init_state = self.policy.next_init(served, served_lora, kept, cfg.training.lora_r)
            self._score_stage(k, trainer.model, served_lora, served, matrix)
            stages.append(stage)
            self._save_stage(k, stage, {key: rows[-1] for key, rows in matrix.items()},
                             kept[-1] if self.policy.keeps_modules else None, served, served_lora, weights)
            self.slots.release()
            # the next stage's trainer resets the same LoRA layers when it can (`attach_adapters`); after the last
            # stage every LoRA layer is stripped: the base goes back to the caller as it came
            keep = (k + 1 < len(self.domains) and self.processes.count == 1 and not self.processes.sharded
                    and not cfg.training.gradient_checkpointing)  # one process, hooks added once
            base = trainer.model if keep else trainer.model.unload()
        report = build_report(cfg, [d.name for d in self.domains], stages, matrix, self._reference_scores)
        if main:
            write_report(out, report, served_lora, served, self.tokenizer)
        self.processes.barrier()
        return report

    def _score_stage(self, k: int, model, served_lora, served, matrix: dict) -> None:
        """The served module after stage k on the domains' report pairs (and judged, with --judge-prompts): one
        matrix row; with --score-domains seen, the domains not trained yet are left out (None)."""
        scored = len(self.domains) if self.config.score_domains == "all" else k + 1
        seen = self.domains[:scored]

        def compute() -> dict:
            rows = self._evaluate(model, served_lora, served, self._report_sets(seen), "served", per_pair=True)
            return {"rows": rows, "reference": {d.name: self._reference_scores[d.name] for d in seen
                                                if d.name in self._reference_scores}}

        if self._shared is None or self.processes.count > 1 or any(d.on_policy is not None for d in seen):
            result = compute()
        else:
            result = self._shared.score(self._scoring_parts(model, served_lora, seen), served, compute)
            for name, scores in result["reference"].items():  # the base's samples a reused result was judged against
                self._reference_scores.setdefault(name, scores)
        rows = result["rows"] + [{}] * (len(self.domains) - scored)  # a domain not scored: None everywhere
        matrix["loss"].append([r.get("loss") for r in rows])
        matrix["accuracy"].append([r.get("accuracy") for r in rows])
        matrix.setdefault("units", []).append(  # per report pair and judged prompt: `headline_units`
            [None if "per_pair" not in r else {**r["per_pair"], "judge_score": r.get("per_prompt", {}).get(
                "judge_score")} for r in rows])
        if self.config.judge_prompts:  # a domain of pairs files only has nothing judged: None
            for key in ("judge_score", "win_rate", "kl"):
                matrix.setdefault(key, []).append([r.get(key) for r in rows])

    def _scoring_parts(self, model, served_lora, seen: list[Domain]) -> dict:
        """What a served module's scores depend on besides its weights (`reuse.SharedWork.score`): the options
        but those of training and combining, the base, the LoRA shape and the scored domains' pairs."""
        not_scoring = NOT_COMPUTED | WEIGHTS_ONLY
        return {"options": {k: v for k, v in self.config.to_dict().items() if k not in not_scoring},
                "base": id(model.get_base_model()), "lora": served_lora.to_dict(),
                "domains": [(d.name, fingerprint(d.test)) for d in seen]}

    # --- resuming ----------------------------------------------------------------------------------------------------
    def _stage_dir(self, k: int) -> Path:
        return self.output_dir / "domains" / f"{k + 1}-{self.domains[k].name}"

    def _save_stage(self, k: int, stage: dict, rows: dict, kept_state, served, served_lora, weights) -> None:
        record = {"stage": stage, "rows": rows, "weights": weights, "reference_scores": self._reference_scores}
        save_stage(self._stage_dir(k), self.processes, record, kept_state, served, served_lora)

    def _load_stage(self, k: int):
        """(stage, rows, kept, served, served LoraConfig, weights) of a finished stage k, or None."""
        finished = load_stage(self._stage_dir(k))
        if finished is None:
            return None
        record, kept, served, served_lora = finished
        self._reference_scores.update(record["reference_scores"])  # the base's judged samples: drawn once per run
        return record["stage"], record["rows"], kept, served, served_lora, record["weights"]

    def _stage_trainer(self, k: int, domain: Domain, base) -> OFSDPOTrainer:
        cfg = self.config
        folder = self._stage_dir(k)
        resume = cfg.resume and bool(list_checkpoints(folder / "checkpoints"))  # the interrupted stage, if it saved
        values = dict(cfg.training.to_dict(), method=self.policy.stage_method, resume=resume, overwrite=True,
                      output_dir=str(folder), max_steps=self.policy.stage_steps(k, cfg.max_steps_per_domain),
                      eval_steps=cfg.training.eval_steps or cfg.training.chase_interval)
        train, train_reference = domain.train, domain.train_reference
        per_domain = (None if cfg.max_steps_per_domain == -1 else  # the pairs one stage's steps train on
                      cfg.max_steps_per_domain * cfg.training.pairs_per_step)
        mixed = self.policy.stage_pairs(k, train.pairs, self.domains[:k], cfg.memory_size, per_domain)
        if mixed is not None:  # another stream: its own reference cache
            train, train_reference = subset(mixed, domain.name), None
        # the selection pairs' reference log-probs are scored once, for every stage (and the λ search)
        if cfg.selection == "memory":
            selection, reference = domain.memory, domain.memory_reference
        else:
            selection, reference = domain.test, domain.test_reference
        return OFSDPOTrainer(base, OFSDPOConfig(**values), train_data=None if domain.on_policy else train,
                             tokenizer=self.tokenizer, eval_data=selection, eval_reference=reference,
                             on_policy_domain=domain.on_policy,
                             train_reference=None if domain.on_policy else train_reference)

    def _evaluate(self, model, lora, state, sets: list[EvalSet], slot: str, per_pair: bool = False,
                  reference_scores: dict | None = None, together: bool | None = None) -> list[dict]:
        """`state`'s row on each set (`evaluation.evaluate`), scored in adapter slot `slot`. The sets' pairs share
        batches; under --score-domains all, every judged domain's prompts are sampled in one call, under seen each
        domain in a call of its own (the domains judged change from stage to stage, and a row's random numbers
        depend on the call's rows). The reference's samples are drawn once per run with the same calls, under the
        run's seed: common random numbers. `reference_scores` and `together`: the report's, unless given."""
        together = self.config.score_domains == "all" if together is None else together
        options = EvalOptions.of_run(self.config.training, judge_samples=self.config.judge_samples,
                                     judge_together=together)
        reference = self._reference_scores if reference_scores is None else reference_scores
        return evaluate(model, self.tokenizer, self.slots.load(model, slot, lora, state), sets, options,
                        reference, per_pair=per_pair)

    def _report_sets(self, domains: list[Domain]) -> list[EvalSet]:
        """The domains' report pairs and, with --judge-prompts, the held-out prompts of those with a judge (built-in
        domains, and on-policy domains with their own judge: SPEC §6 evaluation)."""
        judging = self.config.judge_prompts > 0
        return [EvalSet(d.name, d.test, d.test_reference, *(task if judging and task else (None, [])))
                for d, task in zip(domains, self._judge_tasks())]

    def _judge_tasks(self) -> list[tuple | None]:
        """Per domain, (judged domain, held-out prompt records), or None for a domain of pairs files only."""
        tasks = []
        for d in self.domains:
            judged = self._capped(d.on_policy if d.on_policy is not None and d.on_policy.heldout
                                  else DOMAINS.get(builtin_name(d.name)))
            tasks.append(None if judged is None else (judged, judged.prompts("heldout")[:self.config.judge_prompts]))
        return tasks

    def _capped(self, judged):
        """The judged domain with its samples' length capped by --judge-max-new-tokens (None stays None)."""
        if judged is not None and self.config.judge_max_new_tokens:
            judged = dataclasses.replace(
                judged, max_new_tokens=min(judged.max_new_tokens, self.config.judge_max_new_tokens))
        return judged

    def materialise(self, lora, states: list[dict], weights: list[float], combine: str | None = None):
        """The combined module as (state, LoraConfig), `combine.combine_lora`: `--combine` params, delta (the exact
        Σ λ ΔW, peft's "cat"), or peft's ties / dare_ties / dare_linear at `--density` (DARE seeded from --seed)."""
        return combine_lora(combine or self.config.combine, states, weights, lora, density=self.config.density,
                            seed=self.config.training.seed)

    def candidate_scores(self, model, lora, state, k: int, criterion: Criterion,
                         own_losses: dict[str, float] | None = None) -> dict:
        """A candidate combination's row for the λ search (`selection.candidate_row`): its memory loss and accuracy
        on each of domains 1..k+1 (all seen so far), pooled, and what `criterion` reads besides (`own_losses`, from
        `own_memory_losses`; the judge's mean score of its samples on each domain's selection prompts)."""
        seen = self.domains[:k + 1]
        sets = [EvalSet(d.name, d.memory, d.memory_reference, *(self._selection_task(d) if criterion.judged
                                                                  else (None, []))) for d in seen]
        # the judged samples: one call per domain under the run's seed, the same calls for every candidate (common
        # random numbers), their reference drawn once in those calls, apart from the report's
        rows = self._evaluate(model, lora, state, sets, "candidate", reference_scores=self._selection_reference,
                              together=False if criterion.judged else None)
        domains = {d.name: {"loss": r["loss"], "accuracy": r["accuracy"], "pairs": len(d.memory),
                            **({"judge": r["judge_score"]} if criterion.judged else {})} for d, r in zip(seen, rows)}
        return candidate_row(criterion, domains, own_losses)

    def own_memory_losses(self, model, lora, kept: list[dict], k: int) -> dict[str, float]:
        """{domain: its own kept module's memory loss} for domains 1..k+1, each scored once per run (a kept module and
        its domain's memory never change). `lora`: the LoraConfig the kept modules share."""
        for j in range(k + 1):
            if j not in self._own_memory_loss:
                d = self.domains[j]
                rows = self._evaluate(model, lora, kept[j], [EvalSet(d.name, d.memory, d.memory_reference)],
                                      "candidate")
                self._own_memory_loss[j] = rows[0]["loss"]
        return {self.domains[j].name: self._own_memory_loss[j] for j in range(k + 1)}

    def _selection_task(self, d: Domain) -> tuple:
        """(judged domain, records) of --select-by judge: the last --select-judge-prompts of the domain's training
        prompts (a built-in domain's train split, an on-policy domain's stream prompts), never its held-out prompts,
        which the report judges."""
        judged = self._capped(d.on_policy if d.on_policy is not None else DOMAINS.get(builtin_name(d.name)))
        return judged, judged.prompts("train")[-self.config.select_judge_prompts:]
