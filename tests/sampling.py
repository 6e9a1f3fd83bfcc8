"""One list of prompts sampled through `generation.sample_groups`, the tests' usual case (the package samples
every domain's prompts as groups of one call)."""

from ofsdpo.generation import ROWS_PER_CALL, Samples, sample_groups


def sample_details(model, tokenizer, prompts, chat: bool, num_samples: int = 1, max_new_tokens: int = 32,
                   temperature: float = 1.0, top_p: float = 0.95, batch_size: int = ROWS_PER_CALL,
                   reference: bool = False, merge: bool = True, min_new_tokens: int = 0) -> Samples:
    """`num_samples` `Sample`s per prompt, with the call's wall time in `.seconds` (`batch_size`: rows)."""
    return sample_groups(model, tokenizer, [(prompts, chat, max_new_tokens)], num_samples, temperature, top_p,
                         batch_size, reference, merge=merge, min_new_tokens=min_new_tokens)[0]
