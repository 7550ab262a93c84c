"""The one evaluation core: answer NLL, greedy answers, task accuracy and the answer-slack rule.

Every evaluator in deltafleet goes through these functions: `deltafleet eval` (every tenant through one engine),
the compression frontier's accuracy (`bench compress --task`), training's validation (`deltafleet train`, given
to the recipe by the command), and the low-bit tables (`eval.perplexity`).

Shapes: B rows, T tokens, V vocabulary, M scored positions.

    LogitsAt(ids (B, T), mask (B, T), where (M,)) -> logits (M, V)     where: positions in the flattened B*T batch

A `LogitsAt` hides which model computes: our `Transformer` with an optional projection hook (`transformer_logits`)
or a transformers causal LM, peft layers included (`causal_lm_logits`). The LM head runs only on `where`.

    answer NLL   = sum over answer tokens a_j of -log p(a_j | prompt, a_<j), teacher-forced, fp32 log-softmax
    answer slack = greedy answers get at most (longest reference answer + MAX_ANSWER_SLACK) new tokens
    accuracy     = mean of task.score(answer, example) (whitespace-normalised exact match)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from deltafleet.adapters import Adapter
from deltafleet.adapters.serving import to_serving_form
from deltafleet.dtypes import DTYPES
from deltafleet.errors import DeltafleetError
from deltafleet.models.llama import ProjectionHook, Transformer
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from deltafleet.serve.engine.pools import pool_specs_for
from deltafleet.tasks import Example, Task, encode_example, end_of_turn_id, get_task, prompt_ids
from deltafleet.train.data import PRECISION_CONTEXTS

MAX_ANSWER_SLACK = 4  # generated tokens allowed beyond the longest reference answer
LogitsAt = Callable[[Tensor, Tensor, Tensor], Tensor]


def transformer_logits(model: Transformer, hook: ProjectionHook | None = None) -> LogitsAt:
    def logits_at(ids: Tensor, mask: Tensor, where: Tensor) -> Tensor:
        return model(ids, attention_mask=mask, hook=hook, logits_index=where)

    return logits_at


def causal_lm_logits(causal_lm) -> LogitsAt:
    """A Llama-family transformers model (`.model` decoder, `.lm_head`)."""

    def logits_at(ids: Tensor, mask: Tensor, where: Tensor) -> Tensor:
        hidden = causal_lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
        return causal_lm.lm_head(hidden.reshape(-1, hidden.shape[-1])[where])

    return logits_at


def answer_budget(tokenizer, examples: Sequence[Example]) -> int:
    """New tokens a greedy answer may take: the longest reference answer + MAX_ANSWER_SLACK."""
    return max(len(encode_example(tokenizer, ex).answer_ids) for ex in examples) + MAX_ANSWER_SLACK


@torch.no_grad()
def answer_nll(logits_at: LogitsAt, tokenizer, examples: Sequence[Example], batch_size: int,
               max_len: int) -> tuple[float, int]:
    """Sum of -log p(answer token | prompt, earlier answer tokens) over all examples, and the token count.

    Right-padded batches (B, T) of prompt + answer ids; logits only at the (M,) positions that predict an answer
    token. An example longer than `max_len` loses the tail of its answer (never its prompt; an example whose
    prompt alone fills `max_len` scores no token)."""
    nll, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        enc = [encode_example(tokenizer, ex) for ex in examples[i : i + batch_size]]
        rows = [(list(e.prompt_ids), list(e.answer_ids[: max(0, max_len - len(e.prompt_ids))])) for e in enc]
        T = max(len(p) + len(a) for p, a in rows)
        ids = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        where, targets = [], []
        for b, (p, a) in enumerate(rows):
            ids[b, : len(p) + len(a)] = torch.tensor(p + a)
            mask[b, : len(p) + len(a)] = 1
            where += [b * T + len(p) + j - 1 for j in range(len(a))]  # the position predicting answer token j
            targets += a
        if not targets:
            continue
        logits = logits_at(ids, mask, torch.tensor(where))  # (M, V)
        nll += float(F.cross_entropy(logits.float(), torch.tensor(targets), reduction="sum"))
        count += len(targets)
    return nll, count


def score(task: Task, answers: Sequence[str], examples: Sequence[Example]) -> float:
    return sum(task.score(a, ex) for a, ex in zip(answers, examples, strict=True)) / len(examples)


# ------------------------------------------------------------------------------------------ greedy answers
def base_engine_config(max_batch: int, max_model_len: int, dtype: str = "float32") -> EngineConfig:
    """An engine for offline evaluation of a model without adapters: no pools, an unbounded queue."""
    return EngineConfig(dtype=dtype, max_batch=max_batch, max_model_len=max_model_len, lora_slots=0, delta_slots=0,
                        road_slots=0, max_queue=1 << 30)


def engine_generate(engine: Engine, prompts: Sequence[tuple[list[int], int, str | None]],
                    stop_id: int) -> list[list[int]]:
    """Greedy continuations of (prompt ids, max new tokens, adapter name or None), stopping at `stop_id`, all in
    one `Engine.generate` call (continuous batching mixes adapters in every batch)."""
    outputs = engine.generate([Request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                         stop_token_ids=(stop_id,)), adapter=a)
                               for p, n, a in prompts])
    for o in outputs:
        if o.error is not None:
            raise DeltafleetError(f"adapter {o.adapter!r}: generation failed: {o.error}")
    return [o.token_ids for o in outputs]


def adapters_engine_config(adapters: dict[str, Adapter], dtype: str, max_batch: int,
                           max_model_len: int) -> EngineConfig:
    """An engine for offline evaluation with exactly the pools that keep every adapter of `adapters` resident."""
    forms = [to_serving_form(a, DTYPES[dtype]) for a in adapters.values()]
    return EngineConfig(dtype=dtype, max_batch=max_batch, max_model_len=max_model_len,
                        pools=pool_specs_for((f.family, f.width) for f in forms), max_queue=1 << 30)


def greedy_batch(model: Transformer, prompts: list[tuple[list[int], int]], stop_id: int, max_batch: int,
                 model_len: int) -> list[list[int]]:
    """Greedy continuations of (prompt ids, max new tokens) pairs through the bare base model, batched by the
    engine: the same tokens as `models.generate.greedy_generate` one prompt at a time, several times faster."""
    engine = Engine(model, None, base_engine_config(max_batch, model_len))
    try:
        return engine_generate(engine, [(p, n, None) for p, n in prompts], stop_id)
    finally:
        engine.adapters.shutdown()


def task_accuracy(tokenizer, task_names: Sequence[str], n: int, max_batch: int = 48,
                  split: str = "test") -> Callable[[Transformer], float]:
    """A function model -> mean over `task_names` of exact-match accuracy on `n` examples each (greedy answers
    through the engine, the slack rule, the task's scoring)."""
    eot = end_of_turn_id(tokenizer)
    suites = []
    for name in task_names:
        task = get_task(name)
        if task.kind != "exact_match":
            raise DeltafleetError(f"task={name!r}: accuracy needs an exact_match task, not {task.kind}")
        exs = task.examples(split, n=n)
        suites.append((task, exs, [prompt_ids(tokenizer, ex.prompt) for ex in exs], answer_budget(tokenizer, exs)))
    model_len = max(len(p) + budget for _, _, prompts, budget in suites for p in prompts)

    def accuracy(model: Transformer) -> float:
        prompts = [(p, budget) for _, _, ps, budget in suites for p in ps]
        outputs = iter(greedy_batch(model, prompts, eot, max_batch, model_len))
        accs = []
        for task, exs, _, _ in suites:
            accs.append(score(task, [tokenizer.decode(next(outputs), skip_special_tokens=True) for _ in exs], exs))
        return sum(accs) / len(accs)

    return accuracy


def greedy_answers_hf(model, tokenizer, examples: Sequence[Example], batch_size: int, max_new_tokens: int,
                      precision: str) -> list[str]:
    """Greedy decoding with transformers' `generate` (left-padded batches): for a model in training (peft
    layers, autocast), which the engine does not serve."""
    eot = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    out: list[str] = []
    model.eval()
    for i in range(0, len(examples), batch_size):
        prompts = [prompt_ids(tokenizer, ex.prompt) for ex in examples[i : i + batch_size]]
        T = max(map(len, prompts))
        input_ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])  # (B, T) left-padded
        attention_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad(), PRECISION_CONTEXTS[precision]():
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                       max_new_tokens=max_new_tokens, eos_token_id=eot, pad_token_id=pad)
        out += tokenizer.batch_decode(generated[:, T:], skip_special_tokens=True)
    return out


# ------------------------------------------------------------------------------------------ training validation
def _val_accuracy(task, model, tokenizer, examples, loss, batch_size, precision) -> dict[str, float]:
    answers = greedy_answers_hf(model, tokenizer, examples, batch_size, answer_budget(tokenizer, examples), precision)
    return {"val_accuracy": score(task, answers, examples)}


def _val_perplexity(task, model, tokenizer, examples, loss, batch_size, precision) -> dict[str, float]:
    return {"val_perplexity": math.exp(loss)}


KIND_METRICS: dict[str, Callable[..., dict[str, float]]] = {"exact_match": _val_accuracy,
                                                            "perplexity": _val_perplexity}


def validation_metrics(task: Task, model, causal_lm, tokenizer, examples: Sequence[Example], batch_size: int,
                       max_len: int, precision: str) -> dict[str, float]:
    """What `deltafleet train` reports at the end of a run (the recipe's `validate`): `val_loss`, the mean answer
    NLL per token, then the task kind's metric (`val_accuracy`, or `val_perplexity` = exp(val_loss))."""
    model.eval()
    with PRECISION_CONTEXTS[precision]():
        nll, count = answer_nll(causal_lm_logits(causal_lm), tokenizer, examples, batch_size, max_len)
    if count == 0:
        raise DeltafleetError(f"max_seq_len={max_len}: no validation answer token fits after its prompt")
    loss = nll / count
    return {"val_loss": loss, **KIND_METRICS[task.kind](task, model, tokenizer, examples, loss, batch_size, precision)}

