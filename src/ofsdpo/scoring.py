"""How good a module is: per-pair DPO loss and preference accuracy against the cached reference, which module to
serve (SPEC §3) and the online regret (SPEC §5), and judged samples (judge score, win rate, exact KL(π ‖ π_ref))
drawn with common random numbers."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from .data import PreferenceData, tokenize_pair
from .generation import sample_groups
from .logprobs import pair_logps, sequence_kl
from .losses import dpo_loss
from .modules import activate, reference_mode
from .reference import ReferenceCache


@torch.no_grad()
def pair_losses(model, data: PreferenceData, reference: ReferenceCache, indices: list[int], adapter: str,
                pad_token_id: int, beta: float, batch_size: int = 8, chunk_size: int = 1024, trained=None,
                prompt_once: bool = True):
    """Per-pair DPO loss and correctness (r(y_w) > r(y_l)) of `adapter` on `data[indices]`: no dropout, no grad."""
    return pair_losses_many(model, [(data, reference, indices)], adapter, pad_token_id, beta, batch_size, chunk_size,
                            trained, prompt_once)[0]


@torch.no_grad()
def pair_losses_many(model, sets: list[tuple[PreferenceData, ReferenceCache, list[int]]], adapter: str,
                     pad_token_id: int, beta: float, batch_size: int = 8, chunk_size: int = 1024, trained=None,
                     prompt_once: bool = True):
    """`pair_losses` for several (data, reference, indices) sets at once, their pairs in shared batches (a few
    pairs of each of several domains make one forward, not one each: at a few rows a forward costs about what
    reading the weights does). Each pair's prompt is forwarded once for both its responses (`logprobs.pair_logps`;
    π_ref's log-probs are computed the same way, so a module equal to the base scores log 2 exactly); without
    `prompt_once`, whole sequences. Returns each set's (losses, correct)."""
    for data, reference, indices in sets:
        reference.fill(model, data.pairs, indices, pad_token_id, batch_size, chunk_size, prompt_once)
    items = [(k, i) for k, (_, _, indices) in enumerate(sets) for i in indices]
    if not items:
        return [(torch.zeros(0), torch.zeros(0)) for _ in sets]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    activate(model, adapter, trained)
    pairs = [sets[k][0].pairs[i] for k, i in items]
    chosen, rejected = pair_logps(model, pairs, pad_token_id, batch_size, chunk_size, prompt_once)
    ref_chosen, ref_rejected = _references(sets, items, torch.tensor([p["index"] for p in pairs], dtype=torch.long),
                                           device)
    loss, chosen_rewards, rejected_rewards = dpo_loss(chosen.to(device), rejected.to(device), ref_chosen, ref_rejected,
                                                      beta)
    model.train(was_training)
    losses, correct = loss.float().cpu(), (chosen_rewards > rejected_rewards).float().cpu()
    out, at = [], 0
    for _, _, indices in sets:
        out.append((losses[at:at + len(indices)], correct[at:at + len(indices)]))
        at += len(indices)
    return out


class PairScorer:
    """A training run's own scoring of its modules (the round's pre-update loss, the best fast module, the served
    choice, the regret): per-pair DPO loss and correctness under the run's β, --eval-batch-size (default twice
    --batch-size) and --logprob-chunk-size, no dropout, no gradient, the `trained` modules left trainable."""

    def __init__(self, model, training, pad_token_id: int, trained, prompt_once: bool = True):
        self.model, self.pad_token_id, self.trained, self.prompt_once = model, pad_token_id, trained, prompt_once
        self.beta, self.chunk_size = training.beta, training.logprob_chunk_size
        self.batch_size = training.eval_batch_size or 2 * training.batch_size

    def pair_losses(self, data: PreferenceData, reference: ReferenceCache, indices: list[int], name: str):
        """Per-pair DPO loss and preference correctness of module `name` on `data[indices]`."""
        return pair_losses(self.model, data, reference, indices, name, self.pad_token_id, self.beta, self.batch_size,
                           self.chunk_size, self.trained, self.prompt_once)

    def mean_losses(self, data: PreferenceData, reference: ReferenceCache, indices: list[int],
                    names) -> dict[str, float]:
        """Each module's mean DPO loss on `data[indices]`."""
        return {name: self.pair_losses(data, reference, indices, name)[0].mean().item() for name in names}


def _references(sets, chunk: list[tuple[int, int]], indices: torch.Tensor, device):
    """π_ref's log-probs of a batch whose rows come from several sets: one lookup per set in the batch (each set's
    own cache, by the rows' pair indices), put back in row order."""
    owner = torch.tensor([k for k, _ in chunk])
    chosen, rejected, order = [], [], []
    for k in owner.unique().tolist():
        rows = (owner == k).nonzero().squeeze(-1)
        c, r = sets[k][1].get(indices[rows], device)
        chosen.append(c)
        rejected.append(r)
        order.append(rows)
    back = torch.cat(order).argsort().to(device)
    return torch.cat(chosen)[back], torch.cat(rejected)[back]


def heldout_scores(model, data: PreferenceData, reference: ReferenceCache, adapter: str, pad_token_id: int,
                   beta: float, batch_size: int = 8, chunk_size: int = 1024, trained=None) -> dict[str, float]:
    return heldout_scores_many(model, [(data, reference)], adapter, pad_token_id, beta, batch_size, chunk_size,
                               trained)[0]


def heldout_scores_many(model, sets: list[tuple[PreferenceData, ReferenceCache]], adapter: str, pad_token_id: int,
                        beta: float, batch_size: int = 8, chunk_size: int = 1024, trained=None,
                        per_pair: bool = False) -> list[dict]:
    """Each (data, reference) set's mean DPO loss and accuracy over all its pairs, the sets scored together.
    `per_pair`: also each pair's loss and correctness (1 or 0), in pair order, as "per_pair" (a bootstrap's units)."""
    scored = pair_losses_many(model, [(d, r, list(range(len(d)))) for d, r in sets], adapter, pad_token_id, beta,
                              batch_size, chunk_size, trained)
    return [{"loss": losses.mean().item(), "accuracy": correct.mean().item(),
             **({"per_pair": {"loss": losses.tolist(), "correct": correct.tolist()}} if per_pair else {})}
            for losses, correct in scored]


def _response_batch(sequences: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """(prompt ids, response ids) pairs as one right-padded batch with a response mask (`sequence_logps`'s input)."""
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(sequences):
        input_ids[i, :len(prompt) + len(response)] = torch.tensor(prompt + response)
        attention_mask[i, :len(prompt) + len(response)] = 1
        completion_mask[i, len(prompt):len(prompt) + len(response)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


@torch.no_grad()
def sample_kls(model, tokenizer, prompts: list, responses: list[str], chat: bool, max_length: int = 512,
               batch_size: int = 16, chunk_size: int = 1024) -> torch.Tensor:
    """KL(π ‖ π_ref) along each response (`logprobs.sequence_kl`): π is the model's active adapter at temperature
    1, π_ref the base, the exact per-token KL over the whole vocabulary summed over the response's tokens. Each
    response is tokenized as training tokenizes a completion (`data.tokenize_pair`: EOS appended, the same
    truncation), after its prompt (a string, with `chat` one user message, or a list of messages); `batch_size`
    sequences per forward, each forwarded once as π and once as π_ref."""
    device = next(model.parameters()).device
    sequences = []
    for prompt, response in zip(prompts, responses):
        response = response or " "  # an empty sample still has its EOS to score
        if isinstance(prompt, list) or chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            prompt, response = messages, [{"role": "assistant", "content": response}]
        example, _, _ = tokenize_pair(tokenizer, prompt, response, response, max_length, max_length // 2)
        sequences.append((example["prompt_ids"], example["chosen_ids"]))
    out = torch.zeros(len(sequences), dtype=torch.float64)
    order = sorted(range(len(sequences)), key=lambda i: sum(map(len, sequences[i])))  # similar rows pad little
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in _response_batch([sequences[i] for i in rows],
                                                             tokenizer.pad_token_id).items()}
        out[rows] = sequence_kl(model, **batch, reference=lambda: reference_mode(model),
                                chunk_size=chunk_size).double().cpu()
    return out


@contextlib.contextmanager
def common_random_numbers(seed: int, device: torch.device):
    """Sample from a torch RNG seeded with `seed`, leaving the global RNG as it was. Judging the reference and every
    policy under the same seed makes their samples differ only where the models differ (common random numbers):
    a module that has not moved scores exactly the reference's score, and the noise of one sample per prompt
    largely cancels from the comparison."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _sampled(model, tokenizer, tasks: list[tuple[Any, list[dict]]], samples_per_prompt: int, batch_size: int,
             reference: bool = False, progress: bool = False) -> list[list[str]]:
    """Each (domain, records) task's `samples_per_prompt` responses per record, prompt-major (all of prompt 0's,
    then prompt 1's, …); every task's prompts decoded together, `batch_size` prompts at a time."""
    groups = [([r["prompt"] for r in records], domain.chat, domain.max_new_tokens) for domain, records in tasks]
    per_task = sample_groups(model, tokenizer, groups, samples_per_prompt, batch_size=batch_size * samples_per_prompt,
                             reference=reference, progress=progress)
    return [[s.text for group in samples for s in group] for samples in per_task]


def reference_sample_groups(model, tokenizer, tasks: list[tuple[Any, list[dict]]], batch_size: int = 16,
                            samples_per_prompt: int = 1) -> list[list[float]]:
    """Judge scores of the reference's samples (adapters disabled) for each (domain, records) task, prompt-major:
    the other side of every win rate. Drawn under the same seed and with the same tasks as the policy's
    (`common_random_numbers`, `judge_evals`), sample j of prompt i of both sides uses the same random numbers."""
    responses = _sampled(model, tokenizer, tasks, samples_per_prompt, batch_size, reference=True)
    return [_scores(domain, records, r, samples_per_prompt) for (domain, records), r in zip(tasks, responses)]


def reference_samples(model, tokenizer, domain, records: list[dict], batch_size: int = 16,
                      samples_per_prompt: int = 1) -> list[float]:
    """`reference_sample_groups` for one domain."""
    return reference_sample_groups(model, tokenizer, [(domain, records)], batch_size, samples_per_prompt)[0]


def _scores(domain, records: list[dict], responses: list[str], samples_per_prompt: int,
            judge: str = "score") -> list[float]:
    """The domain's judge scores of prompt-major `responses` (`domain.score`: checked, batched where it can);
    `judge="independent_score"`: its independent judge's."""
    k = samples_per_prompt
    groups = getattr(domain, judge)(records, [responses[i * k:(i + 1) * k] for i in range(len(records))])
    return [x for group in groups for x in group]


def _per_prompt(values: list[float], samples_per_prompt: int) -> list[float]:
    k = samples_per_prompt
    return [sum(values[i:i + k]) / k for i in range(0, len(values), k)]


def judge_evals(model, tokenizer, tasks: list[tuple[Any, list[dict]]], adapter: str | None = None,
                batch_size: int = 16, progress: bool = False, ref_scores: list[list[float]] | None = None,
                samples_per_prompt: int = 1) -> list[dict[str, Any]]:
    """`judge_eval` for several (domain, records) tasks at once: their prompts are sampled in one call and the KL
    of every task's samples computed in one pass (at a few rows per step, one call for three domains takes about
    the time of one). `ref_scores` holds one list per task, drawn by `reference_sample_groups` with the same tasks
    and seed."""
    if adapter is not None:
        activate(model, adapter)
    policy = _sampled(model, tokenizer, tasks, samples_per_prompt, batch_size, progress=progress)
    if ref_scores is None:
        ref_scores = reference_sample_groups(model, tokenizer, tasks, batch_size, samples_per_prompt)
    if len(ref_scores) != len(tasks) or any(len(r) != len(p) for r, p in zip(ref_scores, policy)):
        raise ValueError(f"reference scores ({[len(r) for r in ref_scores]}) do not match the samples "
                         f"({[len(p) for p in policy]}): draw them with the same tasks and samples per prompt")
    # one KL pass over every task's samples: a chat domain's prompt as its one user message
    prompts = [r["prompt"] if isinstance(r["prompt"], list) or not domain.chat
               else [{"role": "user", "content": r["prompt"]}]
               for domain, records in tasks for r in records for _ in range(samples_per_prompt)]
    responses = [y for task in policy for y in task]
    was_training = model.training
    model.eval()
    kls = sample_kls(model, tokenizer, prompts, responses, False, batch_size=batch_size).tolist()
    model.train(was_training)
    results, at = [], 0
    for (domain, records), samples, refs in zip(tasks, policy, ref_scores):
        scores = _scores(domain, records, samples, samples_per_prompt)
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, refs)]
        n, kl = len(samples), kls[at:at + len(samples)]
        at += n
        result = {"judge_score": sum(scores) / n, "reference_judge_score": sum(refs) / n, "win_rate": sum(wins) / n,
                  "kl": sum(kl) / n, "response_words": sum(len(y.split()) for y in samples) / n, "judged_samples": n,
                  "per_prompt": {"judge_score": _per_prompt(scores, samples_per_prompt),
                                 "win_rate": _per_prompt(wins, samples_per_prompt),
                                 "kl": _per_prompt(kl, samples_per_prompt)}}
        if getattr(domain, "independent_judge", None) is not None:  # a judge that never labelled a training pair
            independent = _scores(domain, records, samples, samples_per_prompt, "independent_score")
            result["independent_judge_score"] = sum(independent) / n
            result["per_prompt"]["independent_judge_score"] = _per_prompt(independent, samples_per_prompt)
        results.append(result)
    return results


def judge_eval(model, tokenizer, domain, records: list[dict], adapter: str | None = None, batch_size: int = 16,
               progress: bool = False, ref_scores: list[float] | None = None,
               samples_per_prompt: int = 1) -> dict[str, Any]:
    """Mean judge score of the policy's samples, win rate against the reference's samples (ties count half),
    KL(π ‖ π_ref) along the samples (`sample_kls`: the exact per-token KL of the policy at temperature 1 over the
    whole vocabulary, summed over each judged sample's tokens, averaged over samples), the mean response length in
    words and, for a domain with one, the independent judge's score, over `samples_per_prompt` samples of each
    record. `ref_scores` (from `reference_samples`, same records and samples) lets several evaluations share one
    set of reference samples. `per_prompt` holds each prompt's means: the units of a bootstrap over prompts."""
    return judge_evals(model, tokenizer, [(domain, records)], adapter, batch_size, progress,
                       None if ref_scores is None else [ref_scores], samples_per_prompt)[0]


def select_served(names, eval_scores: dict[str, float] | None, online_losses: list[dict], window: int,
                  leader: str) -> tuple[str, str, dict[str, float]]:
    """SPEC §3: serve the module with the better held-out DPO loss: on `eval_scores` ({module: loss on the eval
    pairs}) when given, else on the mean online loss of the latest `window` rounds. Returns (module, basis, scores)."""
    if len(names) == 1:
        return names[0], "only module", eval_scores or {}
    if eval_scores is not None:
        scores, basis = eval_scores, "eval_data"
    else:
        finite = [r for r in online_losses if all(math.isfinite(r[n]) for n in names)]
        recent = finite[-window:]  # rounds whose loss was NaN cannot rank the modules
        if not recent:
            return leader, "chasing leader (no round with a finite loss)", {}
        scores = {n: sum(r[n] for r in recent) / len(recent) for n in names}
        basis = f"online loss of the last {len(recent)} rounds"
    return min(names, key=lambda n: scores[n]), basis, scores


def regret_curve(online_losses: list[dict], order: list[int], position: int, final_losses: torch.Tensor,
                 served: str) -> list[dict]:
    """Empirical online regret (SPEC §5): the cumulative pre-update round loss of module `served` minus a
    comparator's loss on the same pairs; `final_losses[i]` is the comparator's loss on stream pair i (a run's
    regret.jsonl: its own final module). Against each arm's own final module, an arm that learns less scores less
    regret, so arms are compared by their cumulative online loss instead (the regret difference under any shared
    comparator: `experiment_report.with_online_total`)."""
    curve, regret = [], 0.0
    for i, record in enumerate(online_losses):
        end = online_losses[i + 1]["position"] if i + 1 < len(online_losses) else position
        hindsight = final_losses[order[record["position"]:end]].mean().item()
        regret += record[served] - hindsight
        curve.append({"round": record["round"], "online_loss": record[served], "final_loss": hindsight,
                      "regret": regret})
    return curve
