"""Synthetic retrieval tasks, shared by the training sources (`data.source=mqar`, `passkey`) and by
`sparse_lm.evaluate`: multi-query associative recall, and a needle hidden in a haystack.

Every example is a pure function of a seed and an index, so training, evaluation and resumption all
see the same examples.
"""

import numpy as np

# Zoology (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models"),
# MQAR: vocabulary 8192 and these (sequence length, key-value pairs).
ZOOLOGY_VOCAB = 8192
ZOOLOGY_KV_PAIRS = {64: 4, 128: 8, 256: 16, 512: 64}
# Zoology draws where each query goes from a power law with this exponent, so most queries sit close
# to the end of the key-value context and a few far from it.
ZOOLOGY_POWER_A = 0.01

# The passkey task of Mohtashami & Jaggi 2023 ("Landmark Attention"): a number hidden in repeated
# filler, asked for at the end.
PASSKEY_FILLER = 'The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. '
PASSKEY_NEEDLE = 'The pass key is {key}. Remember it. {key} is the pass key. '
PASSKEY_QUESTION = 'What is the pass key? The pass key is '
# Needle-in-a-haystack: a needle in real text, so nothing but its content sets it apart.
NIAH_NEEDLE = ' The special magic number is {key}. '
NIAH_QUESTION = ' What is the special magic number? The special magic number is '


def rng_for(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, ('train', 'validation', 'eval').index(split), index])


def default_kv_pairs(seq_len: int) -> int:
  """Zoology's pairs for its four lengths; other lengths get one pair per 16 tokens, as its first three."""
  return ZOOLOGY_KV_PAIRS.get(seq_len, max(1, seq_len // 16))


def mqar_example(rng: np.random.Generator, seq_len: int, num_kv_pairs: int, vocab: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """One MQAR sequence `tokens_T` and the positions `query_K` at which the next token is an answer.

  Zoology's layout: keys from [1, vocab/2), values from [vocab/2, vocab), all distinct; first the
  `num_kv_pairs` pairs `k v k v ...`, then a region of zeros where each key is asked once, at an even
  offset drawn from Zoology's power law. Departure: Zoology puts the answer only in a separate label
  array; here the value follows its query key in the sequence, so plain next-token training (loss on
  every token) learns the task, and scoring reads the prediction at the query key.
  """
  context = 2 * num_kv_pairs
  space = (seq_len - context) // 2
  if num_kv_pairs > vocab // 2 - 1 or num_kv_pairs > space:
    raise ValueError(f'MQAR: {num_kv_pairs} key-value pairs do not fit vocab {vocab} and '
                     f'length {seq_len}')
  keys_K = rng.choice(np.arange(1, vocab // 2), num_kv_pairs, replace=False)
  values_K = rng.choice(np.arange(vocab // 2, vocab), num_kv_pairs, replace=False)
  p_S = ZOOLOGY_POWER_A * np.arange(1, space + 1) ** (ZOOLOGY_POWER_A - 1)
  gaps_K = rng.choice(space, num_kv_pairs, replace=False, p=p_S / p_S.sum())
  tokens_T = np.zeros(seq_len, np.int32)
  tokens_T[0:context:2], tokens_T[1:context:2] = keys_K, values_K
  query_K = context + 2 * gaps_K
  tokens_T[query_K], tokens_T[query_K + 1] = keys_K, values_K
  return tokens_T, np.sort(query_K)


def digits(rng: np.random.Generator, num_digits: int) -> str:
  return ''.join(str(d) for d in rng.integers(0, 10, num_digits))


def haystack(filler, needle, question, length: int, depth: float):
  """`filler` (repeated as needed) with `needle` starting `depth` (0 to 1) of the way through it, then
  `question`; `length` long in all. Works on strings and on lists of tokens alike."""
  num_filler = length - len(needle) - len(question)
  if num_filler < 0 or not filler:
    raise ValueError(f'a haystack of length {length} cannot hold a needle of {len(needle)} and a '
                     f'question of {len(question)}')
  filler = (filler * -(-num_filler // len(filler)))[:num_filler]
  before = round(depth * num_filler)
  return filler[:before] + needle + filler[before:] + question


def passkey_document(rng: np.random.Generator, length: int, num_digits: int) -> str:
  """A passkey training document of `length` characters, ending with the answer."""
  key = digits(rng, num_digits)
  return haystack(PASSKEY_FILLER, PASSKEY_NEEDLE.format(key=key), PASSKEY_QUESTION,
                  length - num_digits, rng.uniform()) + key
