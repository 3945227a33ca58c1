"""A RULER-style synthetic long-context suite, generated here, deterministically by seed.

RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?",
arXiv:2404.06654) defines its tasks by templates and sizes, which this module follows; nothing is
downloaded. Every prompt is written in the run's own tokenizer (byte-level ones included) to exactly the
asked length in tokens, the end-of-document token first, as training documents start:

- retrieval, needle in a haystack (NIAH). A needle is "One of the special magic numbers for {key} is:
  {value}." with a word key and a 7-digit value (UUIDs where the task says so); the haystack is noise (a
  repeated "The grass is green. ..." text), or real text (the run's validation split, RULER's essays).
  `niah_single_1` (noise), `niah_single_2` (text), `niah_single_3` (text, UUID values): one needle, asked
  for. `niah_multikey_1` (text): four needles of different keys, one asked for (three distractors);
  `niah_multikey_2`: the haystack is nothing but needles of other keys; `niah_multikey_3`: the same with
  UUID keys and values. `niah_multivalue`: four values of one key, all asked for. `niah_multiquery`: four
  needles of different keys, all four asked for.
- multi-hop tracing, variable tracking (`vt`): a chain "VAR X1 = 12345. VAR X2 = VAR X1. ..." of four
  hops spread through noise; asked for every variable that holds the value (five names).
- aggregation: common words extraction (`cwe`): a numbered list in which 10 words appear often (30
  times in RULER's long setting) and the others rarely (3 times), asked for the 10 common ones; the
  frequencies shrink with the length (at least 2 and 1) so short prompts hold the task. Frequent words
  extraction (`fwe`): a coded text of words drawn by a Zipf law (alpha 2), asked for the three most frequent.

Words are pronounceable strings drawn here (RULER draws English words from a word list, which would
have to be downloaded). RULER's QA tasks (SQuAD, HotpotQA) need their datasets and are not here.

Scoring follows RULER's: the share of the expected answers found in the output (case-insensitive
`string_match_all`), averaged over examples. Each task is scored two ways (`score` and
`score_parallel`): decoding, where the model generates after the prompt (prefill, then one token at a
time with the cache), and one parallel pass over the prompt and each expected answer, where an answer
counts when every one of its tokens is the model's greedy choice. They differ where a sparse variant
chooses differently while prefilling a whole prompt and while decoding ("The Sparse Frontier", Nawrot et
al. 2025, on prefill against decoding); for a model that is not causal the parallel pass would see the
answer, so it is not scored (null).
"""

import dataclasses

import numpy as np

from sparse_lm import synthetic

TASKS = ('niah_single_1', 'niah_single_2', 'niah_single_3', 'niah_multikey_1', 'niah_multikey_2',
         'niah_multikey_3', 'niah_multivalue', 'niah_multiquery', 'vt', 'cwe', 'fwe')
NOISE = synthetic.PASSKEY_FILLER
_CONSONANTS, _VOWELS = 'bcdfghklmnprstvz', 'aeiou'


@dataclasses.dataclass(frozen=True)
class Example:
  prompt: list[int]  # exactly the asked length: EOS, the context, the question and the answer's opening
  answers: tuple[str, ...]  # every one is looked for in the output
  max_new: int  # tokens to generate: the answers joined, with room to spare


def rng_for(seed: int, task: str, length: int, index: int) -> np.random.Generator:
  """The generator of example `index` of `task` at `length`: the same examples for the same seed."""
  return np.random.default_rng([seed, TASKS.index(task), length, index])


def word(rng: np.random.Generator) -> str:
  """A pronounceable word of 2-3 syllables."""
  return ''.join(_CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
                 for _ in range(rng.integers(2, 4)))


def distinct_words(rng: np.random.Generator, count: int) -> list[str]:
  words: list[str] = []
  while len(words) < count:
    w = word(rng)
    if w not in words:
      words.append(w)
  return words


def number(rng: np.random.Generator) -> str:
  return str(rng.integers(1_000_000, 10_000_000))


def uuid(rng: np.random.Generator) -> str:
  hexes = ''.join('0123456789abcdef'[i] for i in rng.integers(0, 16, 32))
  return '-'.join((hexes[:8], hexes[8:12], hexes[12:16], hexes[16:20], hexes[20:]))


class Builder:
  """Writes a task's examples in one tokenizer: `encode(text) -> ids`, `eos`, and `text`, the real text of
  the haystacks that are not noise (the run's validation split)."""

  def __init__(self, encode, eos: int, text: str):
    self.encode, self.eos = encode, eos
    # Haystacks are whole sentences (noise) or lines (text), so a needle never splits a word.
    sentences = [sentence.strip() for sentence in NOISE.split('.') if sentence.strip()]
    self.noise_units = [encode(f' {sentence}.') for sentence in sentences]
    self.text_units = [ids for ids in map(encode, text.splitlines(keepends=True)) if ids]

  def example(self, task: str, length: int, rng: np.random.Generator) -> Example:
    if task not in TASKS:
      raise ValueError(f'unknown RULER task {task!r}; the tasks: {", ".join(TASKS)}')
    return getattr(self, 'niah' if task.startswith('niah_') else task)(task, length, rng)

  # ------------------------------------------------------------------------- assembling

  def _finish(self, context: list[int], question: str, answers, length: int, joiner: str = ', ') -> Example:
    prompt = [self.eos, *context, *self.encode(question)]
    assert len(prompt) == length, (len(prompt), length)
    answer_tokens = len(self.encode(' ' + joiner.join(answers)))
    return Example(prompt, tuple(answers), max(8, int(1.5 * answer_tokens) + 4))

  def _budget(self, length: int, question: str, what: str, needles: int = 0) -> int:
    """Tokens of context (haystack and needles) a prompt of `length` holds beside EOS and the question."""
    budget = length - 1 - len(self.encode(question))
    if budget < needles:
      raise ValueError(f'a prompt of {length} tokens cannot hold {what} ({length - budget + needles} tokens '
                       'without the haystack)')
    return budget

  def _haystack(self, units: list[list[int]], needles: list[list[int]], budget: int, depths) -> list[int]:
    """`budget` tokens: `units` (sentences or lines, repeated as needed, the last one cut) with the
    needles between units at their depths (0-1), in order."""
    if not units:
      raise ValueError('no text to build a haystack from')
    room = budget - sum(map(len, needles))
    hay: list[list[int]] = []
    held = 0
    while held < room:
      unit = units[len(hay) % len(units)][:room - held]
      hay.append(unit)
      held += len(unit)
    out, at = [], 0
    for needle, depth in sorted(zip(needles, depths, strict=True), key=lambda p: p[1]):
      cut = round(depth * len(hay))
      out += [t for unit in hay[at:cut] for t in unit] + needle
      at = cut
    return out + [t for unit in hay[at:] for t in unit]

  def _lead(self, count: int) -> list[int]:
    """`count` spaces before a list that does not fill its prompt (no words, which would count)."""
    return self.encode(' ')[:1] * count

  # ------------------------------------------------------------------------- retrieval

  def _needle(self, key: str, value: str) -> list[int]:
    return self.encode(f' One of the special magic numbers for {key} is: {value}. ')

  def niah(self, task: str, length: int, rng: np.random.Generator) -> Example:
    kind = task[len('niah_'):]
    uuids = kind in ('single_3', 'multikey_3')
    value = uuid if uuids else number
    keys = [uuid(rng) for _ in range(4)] if kind == 'multikey_3' else distinct_words(rng, 4)
    filler = self.noise_units if kind == 'single_1' else self.text_units
    asked: list[str]
    if kind.startswith('single'):
      pairs, asked = [(keys[0], value(rng))], [keys[0]]
    elif kind == 'multivalue':
      pairs, asked = [(keys[0], value(rng)) for _ in range(4)], [keys[0]]
    elif kind == 'multiquery':
      pairs, asked = [(k, value(rng)) for k in keys], keys
    else:  # multikey: one asked for, the others distractors
      pairs, asked = [(k, value(rng)) for k in keys], [keys[0]]
    plural = len(pairs) > 1 and kind in ('multivalue', 'multiquery')
    names = ', '.join(asked[:-1]) + ' and ' + asked[-1] if len(asked) > 1 else asked[0]
    s, are = ('s', 'are') if plural else ('', 'is')
    question = (f' What {"are all" if plural else "is"} the special magic number{s} for {names} mentioned '
                f'in the provided text? The special magic number{s} for {names} mentioned in the provided '
                f'text {are}')
    needles = [self._needle(k, v) for k, v in pairs]
    budget = self._budget(length, question, f'{task}\'s needles', sum(map(len, needles)))
    if kind in ('multikey_2', 'multikey_3'):  # the haystack is other keys' needles, as many as fit
      while True:
        k = uuid(rng) if kind == 'multikey_3' else word(rng)
        extra = self._needle(k, value(rng))
        if k in keys or sum(map(len, needles)) + len(extra) > budget:
          break
        needles.append(extra)
      filler = self.noise_units  # only what the needles leave
    depths = rng.uniform(size=len(needles))
    answers = [v for k, v in pairs if k in asked]
    return self._finish(self._haystack(filler, needles, budget, depths), question, answers, length)

  # ------------------------------------------------------------------------- multi-hop tracing

  def vt(self, task: str, length: int, rng: np.random.Generator) -> Example:
    del task
    names = []
    while len(names) < 5:
      name = ''.join('ABCDEFGHIJKLMNOPQRSTUVWXYZ'[i] for i in rng.integers(0, 26, 5))
      if name not in names:
        names.append(name)
    value = str(rng.integers(10_000, 100_000))
    chain = [f' VAR {names[0]} = {value}. ']
    chain += [f' VAR {names[i]} = VAR {names[i - 1]}. ' for i in range(1, 5)]
    needles = [self.encode(c) for c in chain]
    question = (f' Question: Find all variables that are assigned the value {value} in the text above. '
                f'Answer: According to the chain of variable assignments in the text above, 5 variables are '
                f'assigned the value {value}, they are:')
    budget = self._budget(length, question, 'the variable chain', sum(map(len, needles)))
    depths = (np.arange(5) + rng.uniform(size=5)) / 5  # in order, one in each fifth
    context = self._haystack(self.noise_units, needles, budget, depths)
    return self._finish(context, question, names, length, ' ')

  # ------------------------------------------------------------------------- aggregation

  def cwe(self, task: str, length: int, rng: np.random.Generator) -> Example:
    del task
    question = (' Question: What are the 10 most common words in the above list? Answer: The top 10 words '
                'that appear most often in the list are:')
    budget = self._budget(length, question, 'the common-words question')
    words = distinct_words(rng, 400)
    common, rare = words[:10], words[10:]
    per_entry = np.mean([len(self.encode(f' {i + 1}. {w}')) for i, w in enumerate(words[:50])]) + 1
    entries = int(0.9 * budget / per_entry)
    freq_common = int(np.clip(entries // 20, 2, 30))  # RULER's 30 and 3 at long lengths
    freq_rare = max(1, min(3, freq_common // 3))
    if freq_rare >= freq_common:
      freq_rare = freq_common - 1
    num_rare = max(0, (entries - 10 * freq_common) // freq_rare)
    if num_rare > len(rare):
      rare += distinct_words(rng, num_rare + 400)[:num_rare - len(rare)]
    listed = common * freq_common + [w for w in rare[:num_rare] for _ in range(freq_rare)]
    rng.shuffle(listed)
    # Words seen once fill what the estimate left, so the list reaches the prompt's end.
    listed += [w for w in distinct_words(rng, len(words) + entries) if w not in words]
    body, counts = [], {}
    for i, w in enumerate(listed):
      ids = self.encode(f' {i + 1}. {w}')
      if len(body) + len(ids) > budget:
        break
      body += ids
      counts[w] = counts.get(w, 0) + 1
    if min(counts.get(w, 0) for w in common) <= max([n for w, n in counts.items() if w not in common] or [0]):
      raise ValueError(f'a prompt of {length} tokens cannot hold the common-words list')
    return self._finish(self._lead(budget - len(body)) + body, question, common, length)

  def fwe(self, task: str, length: int, rng: np.random.Generator) -> Example:
    del task
    question = (' Question: Do not give any explanation. What are the three most frequently appeared coded '
                'words in the above coded text? Answer: According to the coded text above, the three most '
                'frequently appeared words are:')
    budget = self._budget(length, question, 'the frequent-words question')
    vocab = distinct_words(rng, 100)
    weights = 1 / np.arange(1, len(vocab) + 1) ** 2.0
    weights /= weights.sum()
    for _ in range(100):  # until the three most frequent are not tied with the fourth
      body, counts = [], {}
      while True:
        w = vocab[rng.choice(len(vocab), p=weights)]
        ids = self.encode(' ' + w)
        if len(body) + len(ids) > budget:
          break
        body += ids
        counts[w] = counts.get(w, 0) + 1
      ranked = sorted(counts.items(), key=lambda kv: -kv[1])
      if len(ranked) >= 3 and (len(ranked) == 3 or ranked[2][1] > ranked[3][1]):
        break
    else:
      raise ValueError(f'a prompt of {length} tokens is too short for the frequent-words task')
    return self._finish(self._lead(budget - len(body)) + body, question, [w for w, _ in ranked[:3]], length)


def recall(output: str, answers) -> float:
  """RULER's `string_match_all`: the share of the answers found in the output, case-insensitive."""
  output = output.lower()
  return sum(a.lower() in output for a in answers) / len(answers)
